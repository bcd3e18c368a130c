"""The optional NudeNet ONNX detector (issue 17): our preprocessing and decoding against nudenet's own
code, used here only as the reference. Only book renders, noise and synthetic model outputs are used."""

import sys

import numpy as np
import pytest
from PIL import Image

from tinydit.data import render_scene, sample_scene  # noqa: E402
from tinydit.safety import EXPLICIT_LABELS, NUDENET_LABELS, OnnxNsfwDetector  # noqa: E402


if not OnnxNsfwDetector.available():
    pytest.skip("optional: onnxruntime or the nudenet package (320n.onnx) is not installed; "
                "pip install tinydit[safety]", allow_module_level=True)
nudenet = pytest.importorskip("nudenet.nudenet", reason="nudenet's own code is the reference")

# Measured with opencv-python-headless 5.0.0.93 on x86-64: bit-exact (max |diff| 0). The bound
# allows one 8-bit level, the most another OpenCV build's rounding could move a pixel.
PREPROCESS_ATOL = 1 / 255 + 1e-6


def _images() -> list:
    rng = np.random.default_rng(0)
    books = [render_scene(sample_scene(0, "test", i), 32) for i in range(16)]
    noise = Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8))  # 640 x 480
    rgba = Image.fromarray(rng.integers(0, 256, (300, 200, 4), dtype=np.uint8), "RGBA")  # 200 x 300
    odd = Image.fromarray(rng.integers(0, 256, (53, 37, 3), dtype=np.uint8))  # upscaled, not square
    return books + [noise, rgba, odd]


def _as_opencv(image: Image.Image) -> np.ndarray:
    """What a nudenet user passes for this image: OpenCV's channel order (BGR, or BGRA with alpha)."""
    if image.mode == "RGBA":
        return np.ascontiguousarray(np.asarray(image)[..., [2, 1, 0, 3]])
    return np.ascontiguousarray(np.asarray(image.convert("RGB"))[..., ::-1])


@pytest.fixture(scope="module")
def detector():
    return OnnxNsfwDetector()


def test_loads(detector):
    assert detector.model_path.name == "320n.onnx"
    (inp,) = detector.session.get_inputs()
    assert inp.shape[1] == 3 and detector.session.get_outputs()[0].shape[1] == 4 + len(NUDENET_LABELS)


def test_preprocess_matches_nudenet(detector):
    worst = 0.0
    for image in _images():
        ours = detector.preprocess(image)
        ref = nudenet._read_image(_as_opencv(image), 320)[0]
        assert ours.shape == ref.shape == (1, 3, 320, 320) and ours.dtype == ref.dtype == np.float32
        worst = max(worst, float(np.abs(ours - ref).max()))
    print(f"preprocess vs nudenet: max |diff| {worst * 255:.3g} / 255")
    assert worst <= PREPROCESS_ATOL


def test_book_images_are_safe(detector):
    books = _images()[:16]
    flags, reasons = detector.check(books)
    assert flags == [False] * len(books), reasons
    assert not any(label in EXPLICIT_LABELS for dets in detector.detect(books) for label, _, _ in dets)


def _same(ours: list, ref: list):
    assert [d[0] for d in ours] == [d["class"] for d in ref]
    np.testing.assert_allclose([d[1] for d in ours], [d["score"] for d in ref], atol=1e-4)
    assert [list(d[2]) for d in ours] == [d["box"] for d in ref]


def test_detect_matches_nudenet(detector):
    reference = nudenet.NudeDetector()
    images = _images()
    for ours, image in zip(detector.detect(images), images):
        _same(ours, reference.detect(_as_opencv(image)))


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 138, 236])
def test_decoding_matches_nudenet_on_synthetic_outputs(detector, seed):
    """Decoding + NMS on made-up raw outputs (the test images detect nothing): 80 confident anchors,
    half of them jittered copies of 4 boxes so that NMS has work to do, some centred outside the
    image so that clipping leaves empty boxes (seeds 138 and 236 once caught rounding differences)."""
    rng = np.random.default_rng(seed)
    width, height = (int(v) for v in rng.integers(16, 1200, 2))
    raw = rng.uniform(0, 0.3, (1, 22, 2100)).astype(np.float32)
    hot = rng.choice(2100, 80, replace=False)
    raw[0, 0:2, hot] = rng.uniform(-20, 340, (80, 2))  # centres, in model pixels (0..320)
    raw[0, 2:4, hot] = rng.uniform(1, 200, (80, 2))  # sizes
    raw[0, 0:4, hot[:40]] = rng.uniform(40, 280, (4, 4))[np.arange(40) % 4] + rng.normal(0, 6, (40, 4))
    raw[0, 4 + rng.integers(0, 18, 80), hot] = rng.uniform(0.1, 0.99, 80)
    side = max(width, height)
    ref = nudenet._postprocess([raw], side - width, side - height, side / width, side / height,
                               width, height, 320, 320)
    ours = detector._decode(raw[0], width, height)
    assert len(ours) > 5
    _same(ours, ref)


def test_errors(monkeypatch, tmp_path):
    with pytest.raises(FileNotFoundError, match="model_path"):
        OnnxNsfwDetector(model_path=tmp_path / "missing.onnx")
    with pytest.raises(ValueError, match="labels"):
        OnnxNsfwDetector(labels=["NOT_A_LABEL"])
    detector = OnnxNsfwDetector()
    with pytest.raises(TypeError, match="images"):
        detector.check([np.zeros((8, 8, 3))])
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now fails
    with pytest.raises(ImportError, match=r"pip install tinydit\[safety\]"):
        OnnxNsfwDetector()
