"""Chapter 09: the training loop — objectives, resume, kill-safety, DDP, the diffusers layout, bad input."""

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from tinydit import train, train_recipe
from tinydit.checkpoint import BOOK_MODEL_DIR
from tinydit.data import ShapesDataset
from tinydit.flow import flow_add_noise
from tinydit.schedules import add_noise


REPO = Path(__file__).resolve().parents[1]
TINY = dict(n_train=64, steps=6, batch_size=16, warmup_steps=2, checkpoint_every=3, snapshot_every=0,
            hidden_size=32, depth=2, num_heads=2)


@pytest.fixture(scope="module")
def tiny_data():
    return train.encode_dataset(ShapesDataset(64, split="train"), disable=True)


def _nonzero(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random and non-zero (the zero-initialised outputs would hide key-map mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1 + 0.01)
    return model


# ---------------------------------------------------------------- objectives

@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "flow"])
def test_objective_targets_match_the_forward_process_and_the_sampling_wrapper(kind):
    """The training target and chapter 08's denoiser agree: a network that outputs the exact target
    makes the denoiser return x0 exactly."""
    obj = train_recipe.parametrisation(train.TrainConfig(objective=kind))
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(8, 4, 8, 8, generator=g), torch.randn(8, 4, 8, 8, generator=g)
    u, normal = torch.rand(8, generator=g), torch.randn(8, generator=g)
    x_t, t, target = obj.noised(x0, noise, u, normal)
    weight = train_recipe.loss_weight(obj, t, 5.0)
    if kind == "flow":
        ref, _ = flow_add_noise(x0, t / obj.num_train_timesteps, noise=noise)
    else:
        ref, _ = add_noise(x0, t, obj.alphas_cumprod.float(), noise=noise)
    torch.testing.assert_close(x_t, ref, atol=1e-6, rtol=1e-6)
    assert bool((weight > 0).all()) and bool((weight <= 1 + 1e-6).all()) or kind == "flow"

    class Oracle(torch.nn.Module):  # returns the target for the batch it was built for
        def forward(self, x, timestep, **_):
            return target

    D = obj.denoiser(Oracle())
    if kind == "flow":
        sigma, x_in = t / obj.num_train_timesteps, x_t
    else:
        ab = obj.alphas_cumprod[t]
        sigma = ((1 - ab) / ab).sqrt().float()
        x_in = x_t * (1 + sigma**2).sqrt()[:, None, None, None]  # Karras scale: x0 + sigma * noise
    torch.testing.assert_close(D(x_in, sigma), x0, atol=2e-4, rtol=1e-4)


def test_min_snr_weights_follow_hang_et_al():
    """v-prediction: w = min(SNR, gamma) / (SNR + 1) (the form diffusers' training scripts use);
    gamma 0 = the plain, unweighted MSE on the target."""
    u = torch.linspace(0, 0.999, 50)
    zeros = torch.zeros(50, 4, 8, 8)
    obj = train_recipe.parametrisation(train.TrainConfig())
    t = obj.noised(zeros, zeros, u, torch.zeros(50))[1]  # (50,) the DDPM steps of u
    w = train_recipe.loss_weight(obj, t, 5.0)
    ab = obj.alphas_cumprod[(u * 1000).long()]
    snr = ab / (1 - ab)
    torch.testing.assert_close(w.double(), torch.minimum(snr, torch.tensor(5.0)) / (snr + 1), atol=1e-6, rtol=1e-5)
    assert 0.1 < u[w.argmax()] < 0.5  # the weight peaks at SNR = gamma, not at either end
    plain = train_recipe.loss_weight(obj, t, 0.0)
    torch.testing.assert_close(plain, torch.ones(50))


# ---------------------------------------------------------------- the diffusers layout

def test_book_model_layout_loads_unmodified_in_diffusers(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    cfg = train.TrainConfig(**TINY)
    model = _nonzero(train.build_model(cfg)).eval()
    folder = train.save_book_model(model, tmp_path / "m", cfg)
    ref = diffusers.PixArtTransformer2DModel.from_pretrained(folder).eval()
    ours = train.TextDiT.from_pretrained(folder)
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(3, 4, 8, 8, generator=g), torch.tensor([10.0, 500.5, 999.0])
    ctx = torch.randn(3, 7, 96, generator=g)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[1, 4:] = False
    with torch.no_grad():
        a = ref(x, encoder_hidden_states=ctx, timestep=t, encoder_attention_mask=mask.long(),
                added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
        b = ours(x, t, context=ctx, context_mask=mask)
        c = model(x, t, context=ctx, context_mask=mask)
    assert (a - b).abs().max() <= 1e-5  # measured ~1e-6
    torch.testing.assert_close(b, c, atol=0, rtol=0)  # the round trip changes nothing


def test_shipped_book_model_matches_diffusers():
    diffusers = pytest.importorskip("diffusers")
    model, objective = train.load_book_model()
    assert objective.prediction == "v_prediction"
    ref = diffusers.PixArtTransformer2DModel.from_pretrained(BOOK_MODEL_DIR).eval()
    from tinydit.text import load_book_text_encoder

    emb = load_book_text_encoder()(["a red triangle on the left", "a big blue circle above a small green square"])
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([999.0, 250.0])
    with torch.no_grad():
        a = ref(x, encoder_hidden_states=emb.tokens, timestep=t, encoder_attention_mask=emb.mask.long(),
                added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
        b = model(x, t, context=emb.tokens, context_mask=emb.mask)
    assert (a - b).abs().max() <= 1e-5


# ---------------------------------------------------------------- previews and the saved parametrisation

@torch.no_grad()
def test_book_pipeline_is_the_shipped_pipeline():
    """Training previews and the evaluator sample through book_pipeline: the same pictures as
    TextToImagePipeline.from_pretrained() (what `python -m tinydit generate` loads)."""
    from tinydit.pipeline import TextToImagePipeline

    shipped = TextToImagePipeline.from_pretrained()
    ours = train.book_pipeline(train.load_book_model()[0])
    assert ours.sampling == shipped.sampling  # the saved scheduler config read back = the config's parametrisation
    captions = ["a red circle on the left", "a blue square above a green triangle"]
    a = ours(captions, seed=[3, 4], num_inference_steps=4, output_type="latent", disable=True).latents
    b = shipped(captions, seed=[3, 4], num_inference_steps=4, output_type="latent", disable=True).latents
    assert torch.equal(a, b)


@pytest.mark.parametrize("overrides", [{}, {"objective": "flow"}, {"objective": "epsilon", "beta_schedule": "scaled_linear"},
                                       {"zero_terminal_snr": True}])
def test_saved_scheduler_config_reads_back_as_the_training_parametrisation(tmp_path, overrides):
    """One object: what a run trains on is what its saved folder samples with (the old writer put
    scaled_linear's range as 1e-4 .. 0.02 into the file)."""
    from tinydit.denoisers import Parametrisation

    cfg = train.TrainConfig(**{**TINY, **overrides})
    folder = train.save_book_model(train.build_model(cfg), tmp_path / "m", cfg)
    saved = json.loads((folder / "scheduler_config.json").read_text())
    param = train_recipe.parametrisation(cfg)
    assert Parametrisation.from_scheduler_config(saved) == dataclasses.replace(param, scheduler=saved["_class_name"])
    torch.testing.assert_close(Parametrisation.from_scheduler_config(saved).alphas_cumprod, param.alphas_cumprod)


# ---------------------------------------------------------------- resume and checkpoints

def _states_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_is_bit_identical(tmp_path, tiny_data):
    cfg = train.TrainConfig(**TINY)
    straight = train.Trainer(cfg, tmp_path / "a", data=tiny_data, disable=True).train()
    first = train.Trainer(cfg, tmp_path / "b", data=tiny_data, disable=True).train(until=3)
    del first  # a new process would start from the file alone
    resumed = train.Trainer(cfg, tmp_path / "b", data=tiny_data, disable=True).resume()
    assert resumed.step == 3
    resumed.train()
    _states_equal(straight.model.state_dict(), resumed.model.state_dict())
    _states_equal(straight.ema.state_dict(), resumed.ema.state_dict())
    assert straight.losses == resumed.losses
    assert straight.opt.state_dict()["state"][0]["step"] == resumed.opt.state_dict()["state"][0]["step"]
    # keep_last: only the newest checkpoints stay
    kept = [p.name for p in train.checkpoints(tmp_path / "b" / "checkpoints")]
    assert kept == ["step-0000003.pt", "step-0000006.pt"]


def test_resume_errors_name_the_problem(tmp_path, tiny_data):
    cfg = train.TrainConfig(**TINY)
    with pytest.raises(FileNotFoundError, match="resume: no checkpoint"):
        train.Trainer(cfg, tmp_path / "empty", data=tiny_data, disable=True).resume()
    train.Trainer(cfg, tmp_path / "run", data=tiny_data, disable=True).train(until=3)
    other = replace(cfg, hidden_size=64, num_heads=4)
    with pytest.raises(ValueError, match=r"hidden_size: checkpoint 32, this run 64.*num_heads"):
        train.Trainer(other, tmp_path / "run", data=tiny_data, disable=True).resume()
    longer = replace(cfg, steps=12)  # a longer run may continue a shorter one
    assert train.Trainer(longer, tmp_path / "run", data=tiny_data, disable=True).resume().step == 3


KILL_SCRIPT = textwrap.dedent("""
    import sys, torch
    from tinydit import train
    from tinydit.data import ShapesDataset
    torch.set_num_threads(1)
    cfg = train.TrainConfig(n_train=64, steps=10_000, batch_size=8, hidden_size=256, depth=6, num_heads=4,
                            checkpoint_every=1, keep_last=2, snapshot_every=0, warmup_steps=1)
    data = train.encode_dataset(ShapesDataset(64, split="train"), disable=True)
    train.Trainer(cfg, sys.argv[1], data=data, disable=True).train()
""")


def test_sigkill_during_a_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    folder = tmp_path / "run" / "checkpoints"
    for _ in range(3):  # a kill can land just after a rename; then try again
        proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(tmp_path / "run")])
        deadline, killed_mid_save = time.monotonic() + 240, False
        try:
            while time.monotonic() < deadline and proc.poll() is None:
                if train.checkpoints(folder) and any(p.name.startswith(".") for p in folder.iterdir()):
                    os.kill(proc.pid, signal.SIGKILL)  # a temp file exists: a save is under way
                    killed_mid_save = True
                    break
                time.sleep(0.001)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        leftovers = [p for p in folder.iterdir() if p.name.startswith(".")]
        if killed_mid_save and leftovers:
            break
    assert killed_mid_save and leftovers, "never caught the process in the middle of a save"
    for path in train.checkpoints(folder):  # every listed checkpoint is complete
        state = torch.load(path, weights_only=True)
        assert state["step"] == int(path.stem.split("-")[1])
    cfg = train.TrainConfig(n_train=64, steps=10_000, batch_size=8, hidden_size=256, depth=6, num_heads=4,
                            checkpoint_every=1, keep_last=2, snapshot_every=0, warmup_steps=1)
    data = train.encode_dataset(ShapesDataset(64, split="train"), disable=True)
    resumed = train.Trainer(cfg, tmp_path / "run", data=data, disable=True).resume()
    assert resumed.step == int(train.checkpoints(folder)[-1].stem.split("-")[1]) >= 1


# ---------------------------------------------------------------- many processes

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_match_one_process(tmp_path):
    """torchrun -m tinydit train on 2 CPU processes (gloo) gives the weights of 1 process on the
    same global batch."""
    env = {**os.environ, "TINYDIT_FAST": "1", "OMP_NUM_THREADS": "1"}
    args = ["-m", "tinydit", "train", "--steps", "4", "--batch-size", "16"]
    one = subprocess.run([sys.executable, *args, "--out", str(tmp_path / "one")], env=env, capture_output=True,
                         text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), *args,
                          "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    a = torch.load(train.checkpoints(tmp_path / "one" / "checkpoints")[-1], weights_only=True)
    b = torch.load(train.checkpoints(tmp_path / "two" / "checkpoints")[-1], weights_only=True)
    assert a["step"] == b["step"] == 4
    moved = max((a["model"][k] - train.build_model(train.TrainConfig.fast()).state_dict()[k]).abs().max()
                for k in a["model"])
    assert moved > 1e-3  # the weights did change, so the comparison below means something
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], atol=1e-6, rtol=1e-5)
    info = json.loads((tmp_path / "two" / "book_model" / "training.json").read_text())
    assert info["processes"] == 2 and info["losses"] == pytest.approx(
        json.loads((tmp_path / "one" / "book_model" / "training.json").read_text())["losses"], abs=1e-5)


# ---------------------------------------------------------------- bad input

def test_bad_configs_and_data_get_clear_errors():
    with pytest.raises(ValueError, match="objective.*x0"):
        train.TrainConfig(objective="x0")
    with pytest.raises(ValueError, match="zero_terminal_snr.*v_prediction"):
        train.TrainConfig(objective="epsilon", zero_terminal_snr=True)
    with pytest.raises(ValueError, match="hidden_size=100.*num_heads=3"):
        train.TrainConfig(hidden_size=100, num_heads=3)
    with pytest.raises(ValueError, match="dataset: yields no samples"):
        train.encode_dataset([], disable=True)


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, tiny_data):
    cfg = train.TrainConfig(**{**TINY, "lr": 1e30, "warmup_steps": 0, "checkpoint_every": 1})
    trainer = train.Trainer(cfg, tmp_path, data=tiny_data, disable=True)
    with pytest.raises(FloatingPointError, match=r"at step (\d+).*last good checkpoint is .*step-") as err:
        trainer.train()
    good = train.checkpoints(tmp_path / "checkpoints")[-1]
    state = torch.load(good, weights_only=True)
    assert f"step {state['step']}" in str(err.value)  # the failing step is the one after the last save
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_cli_train_refuses_to_overwrite_a_run(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "step-0000001.pt").write_bytes(b"")
    env = {**os.environ, "TINYDIT_FAST": "1"}
    r = subprocess.run([sys.executable, "-m", "tinydit", "train", "--out", str(tmp_path)], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "--resume" in r.stderr and "Traceback" not in r.stderr


def test_cli_evaluate_prints_the_table(tmp_path):
    out = tmp_path / "report.json"
    r = subprocess.run([sys.executable, "-m", "tinydit", "evaluate", "--n", "4", "--steps", "4", "--json", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "| HELD_OUT pairs |" in r.stdout and "Fréchet distance" in r.stdout
    result = json.loads(out.read_text())["result"]
    assert set(result["accuracy"]) == {"seen", "held_out", "two"} and result["n"] == 4
    bad = subprocess.run([sys.executable, "-m", "tinydit", "evaluate", "--sampler", "nope", "--n", "2"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "nope" in bad.stderr and "dpmpp_2m" in bad.stderr and "Traceback" not in bad.stderr


def test_compiled_training_matches_eager(tiny_data):
    """TrainConfig(compile=True) runs the same arithmetic through torch.compile (measured 1.4e-6)."""
    cfg = train.TrainConfig(**{**TINY, "steps": 3})
    eager = train.Trainer(cfg, data=tiny_data, disable=True).train()
    compiled = train.Trainer(replace(cfg, compile=True), data=tiny_data, disable=True).train()
    for k, v in eager.model.state_dict().items():
        torch.testing.assert_close(compiled.model.state_dict()[k], v, atol=1e-5, rtol=1e-4)
    assert compiled.losses == pytest.approx(eager.losses, abs=1e-5)
