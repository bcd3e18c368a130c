"""tinydit.pipeline: text to image with the shipped book model, the diffusers pipeline layout both
ways (our folder in diffusers' PixArtAlphaPipeline, a diffusers PixArt folder in ours: same latents),
seeds, offloading, and bad input."""

import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tinydit import evaluate
from tinydit.pipeline import PipelineOutput, SamplingConfig, TextToImagePipeline


PROMPTS = ["a red circle above a blue square", "a green triangle"]


@pytest.fixture(scope="module")
def pipe():
    return TextToImagePipeline.from_pretrained()


def pixels(image) -> torch.Tensor:
    return torch.tensor(np.array(image)).permute(2, 0, 1).float() / 127.5 - 1  # (3, H, W) in [-1, 1]


def test_book_pipeline_draws_what_the_prompt_says(pipe):
    out = pipe(PROMPTS, seed=0, disable=True)
    assert isinstance(out, PipelineOutput) and out.seeds == [0, 1] and out.nsfw is None
    assert [im.size for im in out.images] == [(32, 32)] * 2 and out.latents.shape == (2, 4, 8, 8)
    scenes = [evaluate.read_image(pixels(im)) for im in out.images]
    got = [sorted((o.color, o.shape) for o in r.objects) for r in scenes]
    assert got == [[("blue", "square"), ("red", "circle")], [("green", "triangle")]], got


def test_seeds_make_each_image_independent_of_its_batch(pipe):
    both = pipe(PROMPTS, seed=7, disable=True, output_type="latent").latents
    second = pipe(PROMPTS[1], seed=8, disable=True, output_type="latent").latents
    torch.testing.assert_close(second[0], both[1], atol=1e-5, rtol=0)  # batching changes only float order
    again = pipe(PROMPTS, seed=[7, 8], disable=True, output_type="latent").latents
    assert torch.equal(again, both)
    two = pipe(PROMPTS[0], num_images_per_prompt=2, seed=3, disable=True)
    assert two.prompts == [PROMPTS[0]] * 2 and two.seeds == [3, 4]
    assert not torch.equal(two.latents[0], two.latents[1])


def test_same_seed_is_bit_identical_across_processes(tmp_path):
    code = ("import torch, sys; from tinydit.pipeline import TextToImagePipeline; torch.set_num_threads(1); "
            "p = TextToImagePipeline.from_pretrained(); "
            "torch.save(p(['a red circle above a blue square'], seed=5, disable=True, output_type='latent').latents, sys.argv[1])")
    files = [tmp_path / f"{i}.pt" for i in range(2)]
    for f in files:
        subprocess.run([sys.executable, "-c", code, str(f)], check=True, capture_output=True)
    assert torch.equal(torch.load(files[0]), torch.load(files[1]))


def test_prompt_embeddings_are_cached(pipe):
    pipe.cache.clear()
    hits = pipe.cache.hits
    pipe(PROMPTS, seed=0, num_inference_steps=2, disable=True, output_type="latent")
    pipe(PROMPTS, seed=1, num_inference_steps=2, disable=True, output_type="latent")
    assert pipe.cache.hits - hits == 4  # the second call: both prompts and both empty negatives


def test_save_pretrained_round_trip_and_sampling_defaults(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "p")
    back = TextToImagePipeline.from_pretrained(tmp_path / "p")
    assert back.sampling == pipe.sampling
    a = pipe(PROMPTS, seed=0, disable=True, output_type="latent").latents
    assert torch.equal(back(PROMPTS, seed=0, disable=True, output_type="latent").latents, a)
    changed = TextToImagePipeline.from_pretrained(tmp_path / "p", steps=4, sampler="euler")
    assert (changed.sampling.steps, changed.sampling.sampler) == (4, "euler")


def diffusers_book_call(pipe, ref, noise, output_type):
    """diffusers' PixArtAlphaPipeline `ref` on PROMPTS, fed the book encoder's embeddings (it cannot tokenize
    for it), 20 steps at guidance 2 from `noise`."""
    emb, neg = pipe.encode(PROMPTS), pipe.encode([""] * 2)
    T = max(emb.tokens.shape[1], neg.tokens.shape[1])
    pe, pm = F.pad(emb.tokens, (0, 0, 0, T - emb.tokens.shape[1])), F.pad(emb.mask, (0, T - emb.mask.shape[1])).long()
    ne, nm = F.pad(neg.tokens, (0, 0, 0, T - neg.tokens.shape[1])), F.pad(neg.mask, (0, T - neg.mask.shape[1])).long()
    return ref(prompt=None, negative_prompt=None, prompt_embeds=pe, prompt_attention_mask=pm, negative_prompt_embeds=ne,
               negative_prompt_attention_mask=nm, latents=noise, num_inference_steps=20, guidance_scale=2.0,
               height=32, width=32, use_resolution_binning=False, output_type=output_type, max_sequence_length=T).images


def test_diffusers_pixart_pipeline_loads_our_folder_and_gives_our_latents(pipe, tmp_path):
    from diffusers import PixArtAlphaPipeline

    pipe.save_pretrained(tmp_path / "p")
    ref = PixArtAlphaPipeline.from_pretrained(tmp_path / "p")
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ours = pipe(PROMPTS, latents=noise, disable=True, output_type="latent").latents
    theirs = diffusers_book_call(pipe, ref, noise, "latent")
    err = (theirs - ours).abs().max().item()
    print(f"book model, diffusers PixArtAlphaPipeline vs tinydit: max |latent diff| {err:.2e}")
    assert err < 2e-4  # measured 3.4e-5 on latents of magnitude ~5 (float32 order of operations)


def tiny_diffusers_pipeline(folder, prediction="epsilon", learn_sigma=True):
    """A random PixArt-α pipeline of diffusers (tiny T5, VAE and transformer; every weight non-zero)."""
    from diffusers import (
        AutoencoderKL,
        DPMSolverMultistepScheduler,
        PixArtAlphaPipeline,
        PixArtTransformer2DModel,
    )
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    torch.manual_seed(0)
    words = "a red blue green circle square triangle above below left right of the".split()
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(f"▁{w}", -1.0) for w in words]
    t5 = T5EncoderModel(T5Config(vocab_size=len(vocab), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                 relative_attention_num_buckets=8)).eval()
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4, sample_size=16)
    transformer = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                           out_channels=8 if learn_sigma else 4, num_layers=2, sample_size=8,
                                           patch_size=2, cross_attention_dim=32, caption_channels=32,
                                           norm_eps=1e-6, use_additional_conditions=False,
                                           interpolation_scale=1)  # stated: chapter 07 reads None as side / 64
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in (t5, vae, transformer):
            for p in m.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    scheduler = DPMSolverMultistepScheduler(beta_schedule="linear", prediction_type=prediction)
    ref = PixArtAlphaPipeline(tokenizer=T5Tokenizer(vocab=vocab, extra_ids=0), text_encoder=t5, vae=vae.eval(),
                              transformer=transformer.eval(), scheduler=scheduler)
    ref.save_pretrained(folder)
    return ref


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_a_diffusers_pixart_folder_loads_and_gives_diffusers_latents(tmp_path, prediction):
    ref = tiny_diffusers_pipeline(tmp_path / "d", prediction, learn_sigma=prediction == "epsilon")
    ours = TextToImagePipeline.from_pretrained(tmp_path / "d")
    assert (ours.sampling.sampler, ours.sampling.sigma_schedule, ours.sampling.prediction) == ("dpmpp_2m", "linspace", prediction)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    kw = dict(num_inference_steps=20, guidance_scale=4.5, height=16, width=16)
    theirs = ref(PROMPTS, latents=noise, use_resolution_binning=False, output_type="latent", clean_caption=False, **kw).images
    mine = ours(PROMPTS, latents=noise, disable=True, output_type="latent", **kw).latents
    err = ((theirs - mine).abs().max() / theirs.abs().max()).item()  # random ε-models land far out (|z| ~ 650)
    print(f"tiny diffusers PixArt ({prediction}): max |latent diff| / max |latent| = {err:.2e}")
    assert err < 1e-4  # measured 2.0e-5 (ε) in float32
    images = ours(PROMPTS, latents=noise, disable=True, **kw).images
    assert [im.size for im in images] == [(16, 16)] * 2


def test_model_offload_gives_the_same_images(tmp_path):
    plain = TextToImagePipeline.from_pretrained()
    a = plain(PROMPTS, seed=0, disable=True, output_type="latent").latents
    off = TextToImagePipeline.from_pretrained()
    offloader = off.enable_model_offload(device="cpu")
    b = off(PROMPTS, seed=0, disable=True)
    assert torch.equal(b.latents, a)
    assert offloader.ledger.loads == 3 and offloader.ledger.peak == max(g.bytes for g in offloader.groups)


@pytest.mark.parametrize("call, error, pattern", [
    (dict(prompt=[]), ValueError, "prompt: expected a string or a non-empty list of strings"),
    (dict(prompt=["a red circle", 3]), TypeError, "prompt: every prompt must be a string; got 1: int"),
    (dict(prompt="a", height=30), ValueError, "height: expected a multiple of 8"),
    (dict(prompt="a", width=4), ValueError, "width: expected an integer >= 8"),
    (dict(prompt="a", num_inference_steps=0), ValueError, "num_inference_steps: expected an integer >= 1"),
    (dict(prompt="a", sampler="dpm_fast"), ValueError, "sampler: expected one of"),
    (dict(prompt="a", seed=-1), ValueError, "seed: expected an integer >= 0"),
    (dict(prompt=["a", "b"], seed=[1]), ValueError, "seed: expected one seed, or one per image \\(2\\)"),
    (dict(prompt="a", negative_prompt=["x", "y"]), ValueError, "negative_prompt: expected one string or one string per"),
    (dict(prompt="a", latents=torch.zeros(1, 4, 4, 4)), ValueError, "latents: expected initial noise of shape \\(1, 4, 8, 8\\)"),
    (dict(prompt="a", generator=0), TypeError, "generator: expected a torch.Generator"),
    (dict(prompt="a", guidance_scale=-1), ValueError, "guidance_scale: expected a number >= 0"),
])
def test_bad_calls_get_clear_errors(pipe, call, error, pattern):
    with pytest.raises(error, match=pattern):
        pipe(disable=True, **call)


def test_bad_folders_get_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="is neither a pipeline folder"):
        TextToImagePipeline.from_pretrained(tmp_path)
    (tmp_path / "model_index.json").write_text('{"_class_name": "PixArtAlphaPipeline"}')
    (tmp_path / "vae").mkdir()
    with pytest.raises(FileNotFoundError, match="is a pipeline folder but lacks transformer/, text_encoder/, tokenizer/, scheduler/"):
        TextToImagePipeline.from_pretrained(tmp_path)
    with pytest.raises(TypeError, match="from_pretrained: unknown sampling default"):
        TextToImagePipeline.from_pretrained(None, stepz=3)
    with pytest.raises(ValueError, match="scheduler: 'LMSDiscreteScheduler' has no tinydit counterpart"):
        SamplingConfig.from_scheduler_config({"_class_name": "LMSDiscreteScheduler"})


def test_bf16_pipeline_draws_the_same_scene(pipe):
    half = TextToImagePipeline.from_pretrained(dtype="bf16")
    assert next(half.transformer.parameters()).dtype == torch.bfloat16
    a = pipe(PROMPTS[0], seed=0, disable=True)
    b = half(PROMPTS[0], seed=0, disable=True)
    rel = ((b.latents.float() - a.latents).norm() / a.latents.norm()).item()
    print(f"bf16 vs fp32 final latents: relative difference {rel:.3f}")
    assert rel < 0.05  # measured 0.006: bf16 rounding through 20 steps
    read = evaluate.read_image(pixels(b.images[0]))
    assert sorted((o.color, o.shape) for o in read.objects) == [("blue", "square"), ("red", "circle")]


def test_a_prompt_longer_than_the_window_is_truncated_with_a_counted_warning(pipe):
    with pytest.warns(UserWarning, match=r"prompts\[0\]: 62 tokens is more than the CLIP text encoder's limit of 32"):
        pipe(" ".join(["a red circle"] * 20), seed=0, num_inference_steps=2, disable=True, output_type="latent")


def test_diffusers_decodes_our_folder_to_our_images(pipe, tmp_path):
    """diffusers' PixArt pipeline decodes z / scaling_factor without the VAE's shift_factor; save_pretrained
    folds the book VAE's shift into its 1x1 convs, so the images agree too, not only the latents."""
    from diffusers import PixArtAlphaPipeline

    pipe.save_pretrained(tmp_path / "p")
    ref = PixArtAlphaPipeline.from_pretrained(tmp_path / "p")
    assert ref.vae.config.shift_factor == 0
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ours = pipe(PROMPTS, latents=noise, disable=True, output_type="latent").latents
    theirs = diffusers_book_call(pipe, ref, noise, "pt")
    err = (theirs * 2 - 1 - pipe.decode(ours)).abs().max().item()
    print(f"decoded images, diffusers vs tinydit: max |diff| {err:.1e}")
    assert err < 1e-3  # measured 3.6e-5; without the fold 0.43
    back = TextToImagePipeline.from_pretrained(tmp_path / "p")
    assert (back.decode(ours) - pipe.decode(ours)).abs().max() < 1e-5  # the folded VAE decodes as the original
