"""The multi-modal adapter's parts: projection, encoders, image checks, and the image token in the prompts (Sec. 3.3)."""
import numpy as np
import pytest
import torch

from adapterlab import AdapterConfig, Llama, LlamaConfig, add_adapter
from adapterlab.adapter import adapted_layers, adapter_state_dict, count_trainable
from adapterlab.model import init_weights
from adapterlab.worlds.scenes import COLOURS, CORNERS, IMAGE_SIZE, RGB, SHAPES, Scene, make_scenes, render_scene
from adapterlab.adapter import VisualProjection
from adapterlab.worlds.vision import CLIPEncoder, SceneEncoder, check_images, encode_images

DIM, VOCAB = 64, 97


def small_model(seed=0, n_layers=3):
    cfg = LlamaConfig(dim=DIM, n_layers=n_layers, n_heads=4, vocab_size=VOCAB, multiple_of=16, max_seq_len=64)
    return init_weights(Llama(cfg), seed=seed)


def open_gates(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    for i in adapted_layers(model):
        ap = model.layers[i].attention.adapter
        ap.gate.data = torch.randn(ap.gate.shape, generator=g)


def tokens(B=2, T=9, seed=3):
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------- the projection
def test_projection_shapes_and_parameter_count():
    proj = VisualProjection(112, DIM, hidden=32)
    out = proj(torch.randn(5, 112))
    assert out.shape == (5, DIM)
    # LayerNorm (2 * 112) + fc1 (112 * 32 + 32) + fc2 (32 * 64 + 64) + LayerNorm (2 * 64)
    assert sum(p.numel() for p in proj.parameters()) == 2 * 112 + 112 * 32 + 32 + 32 * DIM + DIM + 2 * DIM == 6080
    with pytest.raises(ValueError, match=r"\(batch, 112\)"):
        proj(torch.randn(5, 100))
    with pytest.raises(ValueError, match="visual_dim"):
        VisualProjection(0, DIM)
    with pytest.raises(ValueError, match="hidden"):
        VisualProjection(112, DIM, hidden=0)


def test_projection_at_7b_matches_the_papers_size():
    """The paper: 1.2M prompts + 0.6M projection at 7B. CLIP ViT-L/14's class token is 1024 wide."""
    with torch.device("meta"):
        proj = VisualProjection(1024, 4096)
    n = sum(p.numel() for p in proj.parameters())
    assert n == 2 * 1024 + 1024 * 128 + 128 + 128 * 4096 + 4096 + 2 * 4096 == 669_824
    assert 0.55e6 < n < 0.7e6


def test_add_adapter_with_visual_dim_trains_prompts_gates_and_projection():
    model = small_model()
    add_adapter(model, AdapterConfig(prompt_len=4, layers=2, visual_dim=112))
    prompts_and_gates = 2 * (4 * DIM + 4)  # K*C prompt values + H gates per adapted layer
    projection = 2 * 112 + 112 * 128 + 128 + 128 * DIM + DIM + 2 * DIM  # default hidden width 128
    assert count_trainable(model) == prompts_and_gates + projection
    keys = adapter_state_dict(model)
    assert {k for k in keys if k.startswith("visual_proj.")} == {
        "visual_proj.norm.weight", "visual_proj.norm.bias", "visual_proj.fc1.weight", "visual_proj.fc1.bias",
        "visual_proj.fc2.weight", "visual_proj.fc2.bias", "visual_proj.out_norm.weight", "visual_proj.out_norm.bias"}
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".adapter." not in n and "visual_proj" not in n)


# ---------------------------------------------------------------------------- the image token in the prompts
def test_zero_gates_multimodal_model_equals_frozen_base_exactly():
    model = small_model()
    x = tokens()
    with torch.no_grad():
        base = model(x)
        add_adapter(model, AdapterConfig(prompt_len=4, layers=3, visual_dim=16))
        visual = model.visual_proj(torch.randn(2, 16) * 3)
        assert visual.abs().max() > 0.1  # a real, non-zero image token
        assert torch.equal(model(x, visual=visual), base)


def test_image_token_changes_prompts_per_sample_once_gates_open():
    model = small_model()
    add_adapter(model, AdapterConfig(prompt_len=4, layers=2, visual_dim=16))
    open_gates(model)
    feats = torch.randn(2, 16, generator=torch.Generator().manual_seed(5))
    x = tokens(B=1).expand(2, -1)  # the same text twice ...
    with torch.no_grad():
        visual = model.visual_proj(feats)  # ... with two different images
        two = model(x, visual=visual)
        same = model(x, visual=visual[:1].expand(2, -1))
        none = model(x[:1])
        # the prompts of every adapted layer are P_l + Repeat(I_p): one set per sample
        layer = adapted_layers(model)[0]
        attn = model.layers[layer].attention
        pk, pv = attn.adapter.prompt_kv(attn, visual)
        pk_ref, pv_ref = attn.adapter.prompt_kv(attn, None)
    assert (two[0] - two[1]).abs().max() > 1e-3  # two images -> two outputs
    assert torch.allclose(same[0], same[1])  # the same image -> the same output
    assert (two[0] - none[0]).abs().max() > 1e-3  # the image matters compared with no image
    assert pk.shape[0] == 2 and not torch.allclose(pk[0], pk[1])
    P = attn.adapter.prompt
    expected_k = attn.split_heads(attn.wk((P[None] + visual[:, None, :])), attn.n_kv_heads)
    assert torch.allclose(pk, expected_k, atol=1e-6)  # W_k (P + Repeat(I_p)), no rotary
    assert pk_ref.shape[0] == 1


def test_gradients_reach_the_projection_only_through_open_gates():
    model = small_model()
    add_adapter(model, AdapterConfig(prompt_len=4, layers=2, visual_dim=16))
    feats = torch.randn(2, 16)
    loss = model(tokens(), visual=model.visual_proj(feats)).logsumexp(-1).mean()
    loss.backward()
    assert model.visual_proj.fc2.weight.grad.abs().max() == 0  # tanh(0) = 0 blocks it at init (Eq. 7)
    model.zero_grad()
    open_gates(model)
    model(tokens(), visual=model.visual_proj(feats)).logsumexp(-1).mean().backward()
    assert model.visual_proj.fc2.weight.grad.abs().max() > 0


# ---------------------------------------------------------------------------- the embedded encoder and pictures
def test_scene_encoder_features_and_input_types():
    torch.manual_seed(0)
    enc = SceneEncoder()
    _, images = make_scenes(3, seed=4)
    f_uint8 = enc(images)
    assert f_uint8.shape == (3, enc.visual_dim) == (3, 2 * (16 + 32 + 64) + 16)  # mean, max per stage + read-out
    assert torch.allclose(enc(images.float() / 255), f_uint8)
    assert torch.allclose(encode_images(enc, images, batch_size=2), f_uint8)
    # position reaches the pooled features (coordinate channels): mirrored pictures differ
    assert (enc(images.flip(-1)) - f_uint8).abs().max() > 1e-4


def test_scene_encoder_pretraining_is_its_plain_loop_and_leaves_torchs_generator_to_the_caller():
    """pretrain_scene_encoder runs through adapterlab.train.train: the weights of the loop it replaced
    (AdamW, betas 0.9/0.999, no decay, no clipping; warm-up + cosine; batches drawn with replacement,
    here larger than the 30 training pictures), and torch's generator where the encoder's init left it
    (the multimodal projection is initialised from there next)."""
    import torch.nn.functional as F

    from adapterlab.train import Schedule, lr_at
    from adapterlab.worlds.vision import SceneEncoderConfig, pretrain_scene_encoder

    scenes, images = make_scenes(40, seed=5)
    encoder, _ = pretrain_scene_encoder(images, scenes, steps=5, batch_size=48, lr=1e-2, seed=2, progress=False)
    after = torch.get_rng_state()

    torch.manual_seed(2)
    ref = SceneEncoder(SceneEncoderConfig(image_size=images.shape[-1]))
    after_init, init = torch.get_rng_state(), ref.readout.weight.clone()
    labels = torch.tensor([s.attribute_ids() for s in scenes])  # (40, 4)
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.0)
    schedule, gen = Schedule(total_steps=5, steps_per_epoch=1, warmup_steps=1), torch.Generator().manual_seed(2)
    for step in range(5):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, schedule, 1e-2)
        idx = torch.randint(0, 30, (48,), generator=gen)
        loss = sum(F.cross_entropy(lg, labels[idx, j]) for j, lg in enumerate(ref.attribute_logits(images[idx])))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    weights = {k: v for k, v in encoder.state_dict().items() if not k.startswith("feature_")}  # (+ feature scales)
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in weights.items())
    assert not torch.equal(ref.readout.weight, init)  # it trained
    assert torch.equal(after, after_init)


def test_scenes_are_deterministic_and_drawn_as_described():
    s1, im1 = make_scenes(6, seed=11)
    s2, im2 = make_scenes(6, seed=11)
    assert s1 == s2 and torch.equal(im1, im2)
    assert im1.shape == (6, 3, IMAGE_SIZE, IMAGE_SIZE) and im1.dtype == torch.uint8
    rng = np.random.default_rng(0)
    for colour in COLOURS:
        for corner in CORNERS:
            img = torch.from_numpy(render_scene(Scene("square", colour, 3, corner), rng)).float()
            background = (img - img.median()).abs().sum(0) < 60  # (H, W)
            ys, xs = torch.nonzero(~background, as_tuple=True)
            half = IMAGE_SIZE / 2
            assert (xs.float().mean() < half) == corner.endswith("left")
            assert (ys.float().mean() < half) == corner.startswith("top")
            inside = img[:, ~background].median(1).values  # typical colour of the drawn pixels
            assert (inside - torch.tensor(RGB[colour], dtype=torch.float)).abs().max() < 25
    with pytest.raises(ValueError, match="cannot draw"):
        render_scene(Scene("hexagon", "red", 1, "top left"), rng)
    assert set(SHAPES) == {"circle", "square", "triangle", "cross"}


# ---------------------------------------------------------------------------- bad pictures
@pytest.mark.parametrize("bad, error, message", [
    (torch.rand(2, 3, 40, 40), ValueError, r"48x48 pixels.*got 40x40"),
    (torch.rand(2, 1, 48, 48), ValueError, r"3 colour channels.*1 channels.*Grey"),
    (torch.rand(2, 4, 48, 48), ValueError, r"3 colour channels.*RGBA"),
    (torch.rand(2, 48, 48, 3), ValueError, r"channels-last.*permute"),
    (torch.randint(0, 255, (2, 3, 48, 48)), TypeError, r"float in \[0, 1\] or uint8.*torch.int64"),
    (torch.rand(2, 3, 48, 48) * 255, ValueError, r"values in \[0, 1\].*Divide"),
    (torch.rand(3, 48), ValueError, r"shape \(batch, 3, height, width\)"),
    (np.zeros((2, 3, 48, 48), dtype=np.float32), TypeError, r"torch.Tensor.*ndarray"),
])
def test_bad_images_give_clear_errors(bad, error, message):
    with pytest.raises(error, match=message):
        SceneEncoder()(bad)


def test_check_images_accepts_a_single_picture():
    picture = make_scenes(1)[1][0]  # uint8 (3, H, W)
    assert check_images(picture).shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)
    nan = torch.rand(1, 3, 8, 8)
    nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        check_images(nan)


# ---------------------------------------------------------------------------- CLIP through transformers
@pytest.fixture(scope="module")
def tiny_clip():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                        num_attention_heads=4, image_size=32, patch_size=8)
    torch.manual_seed(0)
    return transformers.CLIPVisionModel(cfg).eval()


def test_clip_encoder_multiscale_features(tiny_clip):
    enc = CLIPEncoder(tiny_clip, layers=(1, 2, -1))
    assert enc.visual_dim == 3 * 32
    images = torch.rand(2, 3, 32, 32)
    feats = enc(images)
    assert feats.shape == (2, 96)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    with torch.no_grad():
        out = tiny_clip(pixel_values=(images - mean) / std, output_hidden_states=True)
    expected = torch.cat([out.hidden_states[1][:, 0], out.hidden_states[2][:, 0], out.pooler_output], dim=-1)
    assert torch.allclose(feats, expected, atol=1e-6)
    assert all(not p.requires_grad for p in enc.parameters())  # frozen
    # other sizes are resized to CLIP's input; uint8 works; a wrong layer is explained
    assert enc(torch.randint(0, 256, (1, 3, 48, 48), dtype=torch.uint8)).shape == (1, 96)
    with pytest.raises(ValueError, match="layer 7 does not exist"):
        CLIPEncoder(tiny_clip, layers=(7,))
    with pytest.raises(ValueError, match="32x32"):
        CLIPEncoder(tiny_clip, resize=False)(torch.rand(1, 3, 48, 48))


def test_clip_encoder_from_a_local_folder_into_the_adapter(tiny_clip, tmp_path):
    tiny_clip.save_pretrained(tmp_path / "clip")
    enc = CLIPEncoder.from_pretrained(tmp_path / "clip", layers=(-2, -1))
    images = torch.rand(2, 3, 32, 32)
    assert torch.allclose(enc(images), CLIPEncoder(tiny_clip, layers=(-2, -1))(images), atol=1e-6)
    model = small_model()
    add_adapter(model, AdapterConfig(prompt_len=4, layers=2, visual_dim=enc.visual_dim))
    open_gates(model)
    with torch.no_grad():
        logits = model(tokens(B=1).expand(2, -1), visual=model.visual_proj(enc(images)))
    assert logits.shape == (2, 9, VOCAB) and (logits[0] - logits[1]).abs().max() > 1e-4
    with pytest.raises(FileNotFoundError, match="not a transformers CLIP folder"):
        CLIPEncoder.from_pretrained(tmp_path / "nothing")
