"""rewards.image on a tiny random CLIP and VAE written to disk (pipelines.adapters.tiny): shapes and validity, the
score's maths on given embeddings, gradients against finite differences (in float64), the pairing of images with
their own prompts, LatentDecoded against decode-then-reward, pickling, and bad paths named before any loading."""

from __future__ import annotations

import pickle

import pytest
import torch
from safetensors.torch import save_file

pytest.importorskip("transformers")
pytest.importorskip("diffusers")

from pipelines.adapters.tiny import write_tiny_clip, write_tiny_sd  # noqa: E402
from rewards.base import load_reward  # noqa: E402
from rewards.image import (  # noqa: E402
    AestheticScore,
    ClipScore,
    LatentDecoded,
    clip_pixels,
    cosine_score,
    load_linear_head,
)

IMAGE = [3, 16, 16]
LATENT = [4, 8, 8]
PROMPTS = ["a photo of a cat", "a red car", "blue house"]


pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("image_rewards")
    return {"clip": write_tiny_clip(root / "clip"), "sd": write_tiny_sd(root / "sd"), "root": root}


def _images(n: int, seed: int = 0, shape=IMAGE) -> torch.Tensor:
    return torch.rand(n, *shape, generator=torch.Generator().manual_seed(seed)).mul(2).sub(1).reshape(n, -1)


def _directional_check(reward, x: torch.Tensor, cond=None, eps: float = 1e-4) -> tuple[float, float]:
    """(autograd, central difference) of the summed rewards along a random direction, in float64."""
    batch, grad = reward.evaluate_with_grad(x, cond=cond)
    direction = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=x.dtype)
    plus = reward.evaluate(x + eps * direction, cond=cond).rewards.sum()
    minus = reward.evaluate(x - eps * direction, cond=cond).rewards.sum()
    return float((grad * direction).sum()), float((plus - minus) / (2 * eps))


def test_cosine_score_maths():
    image = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    text = torch.tensor([[6.0, 8.0], [0.0, 2.0]])
    assert torch.allclose(cosine_score(image, text, 2.5), torch.tensor([2.5, 0.0]))
    gen = torch.Generator().manual_seed(0)
    text = torch.randn(5, 16, generator=gen)
    image = 3.0 * text + 0.3 * torch.randn(5, 16, generator=gen)  # towers that agree, up to scale and noise
    own = cosine_score(image, text)
    shuffled = cosine_score(image, text.roll(1, 0))
    assert bool((own > shuffled).all()) and float(own.min()) > 90.0


def test_clip_pixels_resizes_crops_and_normalises():
    const = torch.full((2, 3, 20, 30), 0.5)  # [-1, 1] value 0.5 -> 0.75 in [0, 1]; stays constant through resizing
    pixels = clip_pixels(const, 16, mean=(0.5, 0.25, 0.0), std=(0.25, 0.5, 1.0))
    assert pixels.shape == (2, 3, 16, 16)
    assert torch.allclose(pixels[:, 0], torch.tensor(1.0)) and torch.allclose(pixels[:, 1], torch.tensor(1.0))
    assert torch.allclose(pixels[:, 2], torch.tensor(0.75))
    x = torch.rand(1, 3, 16, 16) * 2 - 1  # already at size: only the affine map
    assert torch.allclose(clip_pixels(x, 16, (0.0,) * 3, (1.0,) * 3), (x + 1) / 2)
    wide = torch.zeros(1, 3, 16, 48)
    wide[..., 16:32] = 1.0  # the centre third survives the centre crop
    assert torch.allclose(clip_pixels(wide, 16, (0.0,) * 3, (1.0,) * 3), torch.ones(1, 3, 16, 16))


def test_clip_score_shapes_cache_and_gradient(dirs):
    reward = load_reward("rewards.image:ClipScore", {"path": str(dirs["clip"]), "image_shape": IMAGE,
                                                     "prompt": "a dog"})
    assert reward.differentiable
    x = _images(4)
    out = reward.evaluate(x)
    assert out.rewards.shape == (4,) and out.rewards.dtype == torch.float64 and bool(out.valid.all())
    assert bool((out.rewards.abs() <= 100.0 + 1e-4).all())
    assert reward.text_calls == 1
    reward.evaluate(x, cond=["a dog", PROMPTS[0], PROMPTS[0], "a dog"])
    reward.evaluate(x, cond=["a dog"] * 4)
    assert reward.text_calls == 2 and set(reward._text) == {"a dog", PROMPTS[0]}
    single = reward.evaluate(x[:1], cond=[PROMPTS[0]]).rewards
    assert torch.allclose(single, reward.evaluate(x, cond=[PROMPTS[0]] * 4).rewards[:1], atol=1e-4)  # per row
    reward._load().double()  # float64 for the finite-difference check
    reward._text.clear()
    got, want = _directional_check(reward, _images(3, 1).double(), cond=PROMPTS)
    assert abs(got - want) < 1e-6 * max(1.0, abs(want)) and abs(want) > 1e-3, (got, want)


def test_clip_score_prefers_own_prompt(dirs):
    """Images pushed towards their prompts by the reward's own gradient score higher with their own prompt than
    with another's: the score pairs row i with prompt i."""
    reward = ClipScore(str(dirs["clip"]), IMAGE)
    x = _images(3, 2).requires_grad_(True)
    optimiser = torch.optim.Adam([x], lr=0.05)
    for _ in range(40):
        optimiser.zero_grad()
        (-reward.evaluate(x, cond=PROMPTS).rewards.sum()).backward()
        optimiser.step()
    x = x.detach()
    own = reward.evaluate(x, cond=PROMPTS).rewards
    for shift in (1, 2):
        shuffled = reward.evaluate(x, cond=PROMPTS[shift:] + PROMPTS[:shift]).rewards
        assert bool((own > shuffled + 1.0).all()), (own, shuffled)


def _head(path, layers: dict[str, torch.Tensor]) -> str:
    save_file({k: v.contiguous() for k, v in layers.items()}, str(path))
    return str(path)


def test_aesthetic_score_is_the_head_on_normalised_embeddings(dirs, tmp_path):
    gen = torch.Generator().manual_seed(5)
    weights = {  # LAION-v2-style keys with dropout indices missing; dims 16 -> 8 -> 4 -> 1
        "layers.0.weight": torch.randn(8, 16, generator=gen), "layers.0.bias": torch.randn(8, generator=gen),
        "layers.2.weight": torch.randn(4, 8, generator=gen), "layers.2.bias": torch.randn(4, generator=gen),
        "layers.10.weight": torch.randn(1, 4, generator=gen), "layers.10.bias": torch.randn(1, generator=gen),
    }
    head = _head(tmp_path / "head.safetensors", weights)
    reward = AestheticScore(str(dirs["clip"]), head, IMAGE)
    x = _images(5, 4)
    out = reward.evaluate(x)
    assert out.rewards.shape == (5,) and bool(out.valid.all())
    e = reward.image_embeds(x).detach()
    e = e / e.norm(dim=1, keepdim=True)
    want = e @ weights["layers.0.weight"].T + weights["layers.0.bias"]
    want = want @ weights["layers.2.weight"].T + weights["layers.2.bias"]
    want = want @ weights["layers.10.weight"].T + weights["layers.10.bias"]
    assert torch.allclose(out.rewards.float(), want.squeeze(1), atol=1e-5)
    relu = load_linear_head(head, "relu")
    assert isinstance(relu[1], torch.nn.ReLU) and len(relu) == 5
    reward._load().double()
    reward._head = load_linear_head(head).double()
    got, fd = _directional_check(reward, _images(2, 6).double())
    assert abs(got - fd) < 1e-6 * max(1.0, abs(fd)) and abs(fd) > 1e-4, (got, fd)
    linear = _head(tmp_path / "linear.safetensors",
                   {"weight": torch.randn(1, 16, generator=gen), "bias": torch.zeros(1)})
    assert AestheticScore(str(dirs["clip"]), linear, IMAGE).evaluate(x).rewards.shape == (5,)
    with pytest.raises(ValueError, match="outputs 4 values"):
        load_linear_head(_head(tmp_path / "bad.safetensors", {"weight": torch.randn(4, 16)}))


def test_latent_decoded_is_decode_then_reward(dirs):
    from diffusers import AutoencoderKL

    kwargs = {"path": str(dirs["clip"]), "prompt": "a cat"}
    reward = LatentDecoded(str(dirs["sd"]), "rewards.image:ClipScore", kwargs)  # the pipeline root: finds vae/
    assert reward.latent_shape == tuple(LATENT) and reward.image_shape == tuple(IMAGE) and reward.differentiable
    z = torch.randn(3, 256, generator=torch.Generator().manual_seed(7))
    got = reward.evaluate(z, cond=PROMPTS).rewards
    vae = AutoencoderKL.from_pretrained(str(dirs["sd"] / "vae"), local_files_only=True)
    with torch.no_grad():
        images = vae.decode(z.reshape(3, *LATENT) / vae.config.scaling_factor).sample
    want = ClipScore(str(dirs["clip"]), IMAGE).evaluate(images.reshape(3, -1), cond=PROMPTS).rewards
    assert torch.allclose(got, want, atol=1e-4), (got, want)
    assert not torch.allclose(got, reward.evaluate(z).rewards)  # cond None: the inner reward's own prompt
    reward.decode(z[:1])
    reward._vae.double()
    reward.inner._load().double()
    grad_dot, fd = _directional_check(reward, z[:2].double(), cond=PROMPTS[:2], eps=1e-5)
    assert abs(grad_dot - fd) < 1e-5 * max(1.0, abs(fd)) and abs(fd) > 1e-4, (grad_dot, fd)
    copy = pickle.loads(pickle.dumps(reward))  # travels without its loaded models
    assert copy._vae is None and copy.inner._model is None and len(pickle.dumps(reward)) < 20_000
    assert torch.allclose(copy.evaluate(z, cond=PROMPTS).rewards, want, atol=1e-4)


def test_bad_paths_name_the_kwarg_before_loading(dirs, tmp_path):
    # a copy of the CLIP model whose weights are garbage: loading it would fail with another error
    import shutil

    broken = tmp_path / "broken_clip"
    shutil.copytree(dirs["clip"], broken)
    weights = [f for f in broken.rglob("*") if f.suffix in (".safetensors", ".bin")]
    assert weights
    for f in weights:
        f.write_bytes(b"not weights")
    missing = tmp_path / "nowhere"
    with pytest.raises(ValueError, match=r"'reward\.kwargs\.path': .*nowhere.* is not a directory"):
        ClipScore(str(missing), IMAGE)
    with pytest.raises(ValueError, match=r"'reward\.kwargs\.path': .* has no config\.json"):
        ClipScore(str(tmp_path), IMAGE)
    with pytest.raises(ValueError, match=r"'reward\.kwargs\.head': .*head\.pt.* is not a file"):
        AestheticScore(str(broken), str(tmp_path / "head.pt"), IMAGE)
    with pytest.raises(ValueError, match=r"'reward\.kwargs\.vae_path': .*nowhere"):
        LatentDecoded(str(missing), "rewards.image:ClipScore", {"path": str(broken)})
    with pytest.raises(ValueError, match=r"'reward\.kwargs\.image_shape'"):
        ClipScore(str(broken), [16, 16])
    with pytest.raises(ValueError, match="ClipScore needs prompts"):
        ClipScore(str(broken), IMAGE).evaluate(_images(1))
    with pytest.raises(Exception) as loading:  # the copy is broken indeed: good settings reach the weights
        ClipScore(str(broken), IMAGE).evaluate(_images(1), cond=["a red disc"])
    assert "reward.kwargs" not in str(loading.value)
