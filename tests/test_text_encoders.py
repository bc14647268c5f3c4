"""Text encoders: parity with transformers (models and tokenizers), every file layout, bad input.

Models are tiny (flux_core.text_encoders.TINY_T5 / TINY_CLIP) with random weights; comparisons are fp32
against the transformers implementation run on exactly the weights a correct loader must decode.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch

import text_factory as tf
from flux_core.errors import CheckpointError, TokenizerFilesMissing
from flux_core.text_encoders import (TINY_CLIP, TINY_T5, CLIPConfig, CLIPTextModel, T5Encoder, TextEncoders,
                                     find_tokenizer_folders, heads_for, load_clip, load_t5, load_text_encoders,
                                     load_tokenizers, random_text_encoders)
from flux_core.text_encoders.tokenization import ENV_VAR

ATOL = 2e-5  # fp32, same weights: observed differences are ~1e-6
PROMPTS = [
    "a photo of a cat",
    "Hello, World!! What's up?? (masterpiece:1.2), [best] {quality} -- 'quoted' \"double\"",
    "3 cats, 12 dogs and 1,000,000 birds at 4.5e6 Hz on 2024-01-31 12:30",
    "café naïve résumé 日本語のテキスト Ünïcödé 🐱🍕🚀 ½ ﬁ — “smart quotes”",
    "  leading and trailing spaces  \t tabs\nnew lines  ",
    "",
    "a very long prompt " + " ".join(f"word{i} with detail" for i in range(300)),  # > 512 T5 tokens
    "ALL CAPS and MiXeD case, emoji 👍🏽 and a literal <|endoftext|> marker",
]
# the first cat example of formats.md §2e
CAT_T5 = [3, 9, 1202, 13, 3, 9, 1712, 1, 0]
CAT_CLIP = [49406, 320, 1125, 539, 320, 2368, 49407, 49407]


def maxdiff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


# --- shared fixtures ------------------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def _no_env_dir(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)


@pytest.fixture(scope="module")
def hf_t5():
    return tf.hf_t5(TINY_T5, seed=0)


@pytest.fixture(scope="module")
def hf_clip():
    return tf.hf_clip(TINY_CLIP, seed=0)


@pytest.fixture(scope="module")
def t5_sd(hf_t5):
    return tf.t5_state(hf_t5)


@pytest.fixture(scope="module")
def clip_sd(hf_clip):
    return tf.clip_state(hf_clip)


@pytest.fixture(scope="module")
def toks():
    return load_tokenizers()


@pytest.fixture(scope="module")
def ids(toks):
    """Real prompts, tokenized; T5 cut to 300 tokens (past the 128 max bias distance) to stay quick."""
    t5_ids, clip_ids = toks(PROMPTS[:4] + PROMPTS[6:7])
    return t5_ids[:, :300], clip_ids


def check_t5(path, hf_t5, decoded, ids, atol=ATOL):
    ours = load_t5(path, dtype=torch.float32)
    with torch.inference_mode():
        got = ours(ids)
    ref = tf.run_hf_t5(hf_t5, decoded, ids)
    d = maxdiff(got, ref)
    assert d < atol, f"T5 from {Path(path).name}: max |diff| {d:.2e}"
    return got


def check_clip(path, hf_clip, decoded, ids, atol=ATOL):
    ours = load_clip(path, dtype=torch.float32)
    with torch.inference_mode():
        hidden, pooled = ours(ids)
    ref_hidden, ref_pooled = tf.run_hf_clip(hf_clip, decoded, ids)
    d1, d2 = maxdiff(hidden, ref_hidden), maxdiff(pooled, ref_pooled)
    assert d1 < atol and d2 < atol, f"CLIP from {Path(path).name}: hidden {d1:.2e}, pooled {d2:.2e}"
    return pooled


# --- model parity ---------------------------------------------------------------------------------------

def test_t5_matches_transformers(tmp_path, hf_t5, t5_sd, ids):
    path = tf.save(t5_sd, tmp_path / "t5.safetensors")
    model = load_t5(path, dtype=torch.float32)
    assert isinstance(model, T5Encoder) and model.config == TINY_T5
    random_ids = torch.randint(0, TINY_T5.vocab_size, (2, 300), generator=torch.Generator().manual_seed(0))
    for batch in (ids[0], random_ids):
        with torch.inference_mode():
            got = model(batch)
        ref = tf.run_hf_t5(hf_t5, t5_sd, batch)
        assert got.shape == ref.shape == (batch.shape[0], 300, 64)
        assert ref.abs().mean() > 0.1  # the comparison is not against near-zeros
        assert maxdiff(got, ref) < ATOL


@pytest.mark.parametrize("hidden", [64, 128])  # 1 head (TINY_CLIP) and 2 heads
def test_clip_matches_transformers(tmp_path, hidden, ids):
    cfg = CLIPConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_heads=heads_for(hidden), num_layers=2)
    hf = tf.hf_clip(cfg, seed=hidden)
    sd = tf.clip_state(hf)
    path = tf.save(sd, tmp_path / "clip_l.safetensors")
    model = load_clip(path, dtype=torch.float32)
    assert isinstance(model, CLIPTextModel) and model.config == cfg
    # random ids with the end token at varied places (pooling must take the first one)
    rnd = torch.randint(0, 49406, (3, 77), generator=torch.Generator().manual_seed(1))
    rnd[0, 5] = rnd[0, 40] = 49407
    rnd[1, 76] = 49407
    for batch in (ids[1], rnd):
        with torch.inference_mode():
            hidden_state, pooled = model(batch)
        ref_hidden, ref_pooled = tf.run_hf_clip(hf, sd, batch)
        assert maxdiff(hidden_state, ref_hidden) < ATOL
        assert maxdiff(pooled, ref_pooled) < ATOL
    assert model.eos_positions(rnd).tolist() == [5, 76, 0]  # none: position 0, like transformers


def test_tiny_configs_follow_the_inference_rules():
    assert TINY_T5.d_model == 64 and TINY_T5.num_heads * TINY_T5.d_kv == 64
    assert TINY_CLIP.hidden_size == 64 and TINY_CLIP.num_heads == heads_for(64) == 1
    assert heads_for(768) == 12 and heads_for(1280) == 20 and heads_for(32) == 1


# --- tokenizers -----------------------------------------------------------------------------------------

def test_tokenizers_match_transformers(toks):
    from transformers import CLIPTokenizer, T5TokenizerFast

    hf_t5 = T5TokenizerFast.from_pretrained(str(toks.t5.folder))
    hf_clip = CLIPTokenizer.from_pretrained(str(toks.clip.folder))
    t5_ids, clip_ids = toks(PROMPTS)
    assert t5_ids.shape == (len(PROMPTS), 512) and clip_ids.shape == (len(PROMPTS), 77)
    assert t5_ids[0, :9].tolist() == CAT_T5 and clip_ids[0, :8].tolist() == CAT_CLIP
    for i, prompt in enumerate(PROMPTS):
        ref_t5 = hf_t5(prompt, padding="max_length", max_length=512, truncation=True).input_ids
        ref_clip = hf_clip(prompt, padding="max_length", max_length=77, truncation=True).input_ids
        assert t5_ids[i].tolist() == ref_t5, prompt
        assert clip_ids[i].tolist() == ref_clip, prompt
    long_t5, long_clip = t5_ids[6], clip_ids[6]
    assert long_t5[-1] == 1 and (long_t5 != 0).all()  # truncated, </s> kept, no padding
    assert long_clip[0] == 49406 and long_clip[-1] == 49407 and (long_clip[1:-1] != 49407).all()
    assert clip_ids[5, :2].tolist() == [49406, 49407] and t5_ids[5, 0] == 1  # empty prompt


def _hide_installed_comfyui(monkeypatch):
    """Another test module may have put the real host on sys.path or imported it: hide it from the search."""
    monkeypatch.delitem(sys.modules, "comfy", raising=False)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if not (Path(p or ".") / "comfy").is_dir()])


def test_default_search_finds_the_project_copy(monkeypatch):
    _hide_installed_comfyui(monkeypatch)
    repo = Path(__file__).resolve().parents[1]
    t5_dir, clip_dir = find_tokenizer_folders()
    assert t5_dir.resolve() == repo / ".cache" / "comfyui" / "comfy" / "text_encoders" / "t5_tokenizer"
    assert clip_dir.resolve() == repo / ".cache" / "comfyui" / "comfy" / "sd1_tokenizer"


def _link_tokenizer_files(src_t5: Path, src_clip: Path, t5_dir: Path, clip_dir: Path):
    for src, dst, names in ((src_t5, t5_dir, ["tokenizer.json"]), (src_clip, clip_dir, ["vocab.json", "merges.txt"])):
        dst.mkdir(parents=True, exist_ok=True)
        for n in names:
            shutil.copyfile(src / n, dst / n)


@pytest.mark.parametrize("layout", [("tokenizer_2", "tokenizer"), ("t5", "clip"), ("t5_tokenizer", "sd1_tokenizer")])
def test_tokenizer_folder_layouts(tmp_path, monkeypatch, toks, layout):
    _link_tokenizer_files(toks.t5.folder, toks.clip.folder, tmp_path / layout[0], tmp_path / layout[1])
    assert find_tokenizer_folders(tmp_path) == (tmp_path / layout[0], tmp_path / layout[1])
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    assert find_tokenizer_folders() == (tmp_path / layout[0], tmp_path / layout[1])
    other = load_tokenizers(tmp_path)
    assert torch.equal(other(PROMPTS[:2])[0], toks(PROMPTS[:2])[0])


def test_comfyui_on_sys_path_is_found_without_importing_it(tmp_path, monkeypatch, toks):
    _hide_installed_comfyui(monkeypatch)
    root = tmp_path / "ComfyUI"
    _link_tokenizer_files(toks.t5.folder, toks.clip.folder, root / "comfy" / "text_encoders" / "t5_tokenizer",
                          root / "comfy" / "sd1_tokenizer")
    monkeypatch.setattr(sys, "path", [str(root)] + sys.path)  # restored as the same list object afterwards
    assert find_tokenizer_folders() == (root / "comfy" / "text_encoders" / "t5_tokenizer",
                                        root / "comfy" / "sd1_tokenizer")
    assert "comfy" not in sys.modules


def test_missing_tokenizer_files_lists_places_looked(tmp_path):
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "vocab.json").write_text("{}")  # merges.txt missing: not a CLIP folder
    with pytest.raises(TokenizerFilesMissing) as err:
        load_text_encoders(tmp_path / "nope.safetensors", None, tokenizer_dir=tmp_path)
    msg = str(err.value)
    assert "tokenizer.json" in msg and "vocab.json + merges.txt" in msg
    for sub in ("comfy/text_encoders/t5_tokenizer", "tokenizer_2", "t5", "comfy/sd1_tokenizer", "tokenizer", "clip"):
        assert str(tmp_path / sub) in msg
    assert isinstance(err.value, FileNotFoundError)


# --- file layouts ---------------------------------------------------------------------------------------

T5_LAYOUTS = ["bare_fp32", "embed_tokens_only", "both_embeddings_fp16", "bf16", "all_in_one", "sharded_folder",
              "diffusers_root", "fp8_plain", "fp8_scaled", "fp8_weight_scale", "fp8_all_in_one"]


def write_t5(layout: str, sd: dict, clip_sd: dict, tmp: Path):
    """(path, decoded tensors) for one T5 layout."""
    if layout == "bare_fp32":
        return tf.save(sd, tmp / "t5.safetensors"), sd
    if layout == "embed_tokens_only":
        stored = {("encoder.embed_tokens.weight" if k == "shared.weight" else k): v for k, v in sd.items()}
        return tf.save(stored, tmp / "t5.safetensors"), sd
    if layout == "both_embeddings_fp16":
        stored, dec = tf.cast(sd, torch.float16)
        stored["encoder.embed_tokens.weight"] = stored["shared.weight"].clone()
        return tf.save(stored, tmp / "t5xxl_fp16.safetensors"), dec
    if layout == "bf16":
        stored, dec = tf.cast(sd, torch.bfloat16)
        return tf.save(stored, tmp / "t5.safetensors"), dec
    if layout == "all_in_one":
        stored, dec = tf.cast(sd, torch.float16)
        return tf.save(tf.all_in_one(stored, tf.cast(clip_sd, torch.float16)[0]), tmp / "ckpt.safetensors"), dec
    if layout == "sharded_folder":
        return tf.sharded(sd, tmp / "text_encoder_2"), sd
    if layout == "diffusers_root":
        return tf.diffusers_root(sd, clip_sd, tmp / "FLUX.1-dev"), sd
    if layout == "fp8_plain":
        stored, dec = tf.plain_fp8(sd)
        return tf.save(stored, tmp / "t5xxl_fp8_e4m3fn.safetensors"), dec
    if layout == "fp8_scaled":
        stored, dec = tf.scaled_fp8(sd)
        return tf.save(stored, tmp / "t5xxl_fp8_e4m3fn_scaled.safetensors"), dec
    if layout == "fp8_weight_scale":
        stored, dec = tf.scaled_fp8(sd, spelling="weight_scale", marker=None)
        meta = {"_quantization_metadata": '{"format_version": "1.0", "layers": {}}'}
        return tf.save(stored, tmp / "t5_mixed.safetensors", metadata=meta), dec
    if layout == "fp8_all_in_one":
        stored, dec = tf.plain_fp8(sd)
        return tf.save(tf.all_in_one(stored, tf.cast(clip_sd, torch.float16)[0]), tmp / "flux1-dev-fp8.safetensors"), dec
    raise AssertionError(layout)


@pytest.mark.parametrize("layout", T5_LAYOUTS)
def test_t5_layouts(tmp_path, layout, hf_t5, t5_sd, clip_sd, ids):
    path, decoded = write_t5(layout, t5_sd, clip_sd, tmp_path)
    got = check_t5(path, hf_t5, decoded, ids[0])
    if layout.startswith("fp8"):
        # and, loosely, still the same model as the unquantized weights
        ref = tf.run_hf_t5(hf_t5, t5_sd, ids[0])
        rel = maxdiff(got, ref) / ref.abs().max().item()
        assert rel < 0.25, f"fp8 drift {rel:.3f}"


CLIP_LAYOUTS = ["text_model_fp16_with_extras", "flat_keys", "all_in_one", "hf_folder", "diffusers_root",
                "fp8_plain", "bf16"]


@pytest.mark.parametrize("layout", CLIP_LAYOUTS)
def test_clip_layouts(tmp_path, layout, hf_clip, t5_sd, clip_sd, ids):
    if layout == "text_model_fp16_with_extras":
        stored, dec = tf.cast(clip_sd, torch.float16)
        stored.update({"text_projection.weight": torch.randn(64, 64), "logit_scale": torch.tensor(4.6),
                       "text_model.embeddings.position_ids": torch.arange(77)[None]})
        path = tf.save(stored, tmp_path / "clip_l.safetensors")
    elif layout == "flat_keys":  # transformers 5's in-memory naming
        dec = clip_sd
        path = tf.save({k.removeprefix("text_model."): v for k, v in clip_sd.items()}, tmp_path / "clip.safetensors")
    elif layout == "all_in_one":
        stored, dec = tf.cast(clip_sd, torch.float16)
        path = tf.save(tf.all_in_one(tf.plain_fp8(t5_sd)[0], stored), tmp_path / "ckpt.safetensors")
    elif layout == "hf_folder":
        dec = clip_sd
        path = tf.save(clip_sd, tmp_path / "text_encoder" / "model.safetensors").parent
    elif layout == "diffusers_root":
        dec = clip_sd
        path = tf.diffusers_root(t5_sd, clip_sd, tmp_path / "FLUX.1-dev")
    elif layout == "fp8_plain":
        stored, dec = tf.plain_fp8(clip_sd)
        path = tf.save(stored, tmp_path / "clip_l_fp8.safetensors")
    else:
        stored, dec = tf.cast(clip_sd, torch.bfloat16)
        path = tf.save(stored, tmp_path / "clip_l_bf16.safetensors")
    check_clip(path, hf_clip, dec, ids[1])


# --- the public entry point -----------------------------------------------------------------------------

def test_load_text_encoders_end_to_end(tmp_path, hf_t5, hf_clip, t5_sd, clip_sd):
    from transformers import CLIPTokenizer, T5TokenizerFast

    ckpt = tf.save(tf.all_in_one(t5_sd, clip_sd), tmp_path / "ckpt.safetensors")
    enc = load_text_encoders(ckpt, ckpt, dtype=torch.float32)
    assert isinstance(enc, TextEncoders) and enc.t5_max_length == 512
    prompts = [PROMPTS[0], PROMPTS[3]]
    txt, vec = enc.encode(prompts)
    assert txt.shape == (2, 512, 64) and vec.shape == (2, 64) and txt.dtype == vec.dtype == torch.float32
    assert not txt.requires_grad and txt.is_inference()

    # the whole chain against transformers' tokenizers + models
    t5_ids = T5TokenizerFast.from_pretrained(str(enc.tokenizers.t5.folder))(
        prompts, padding="max_length", max_length=512, truncation=True, return_tensors="pt").input_ids
    clip_ids = CLIPTokenizer.from_pretrained(str(enc.tokenizers.clip.folder))(
        prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert maxdiff(txt, tf.run_hf_t5(hf_t5, t5_sd, t5_ids)) < ATOL
    assert maxdiff(vec, tf.run_hf_clip(hf_clip, clip_sd, clip_ids)[1]) < ATOL

    # a single string is a batch of one; clip_path=None reuses the all-in-one file
    one_txt, one_vec = load_text_encoders(ckpt, None, dtype=torch.float32).encode(PROMPTS[0])
    assert one_txt.shape == (1, 512, 64) and maxdiff(one_vec, vec[:1]) < 1e-6

    # offloading and freeing
    enc.move_t5("cpu").move_clip("cpu")
    enc.free_t5()
    assert enc.t5 is None and enc.encode_clip("x").shape == (1, 64)
    with pytest.raises(RuntimeError, match="freed"):
        enc.encode("x")
    with pytest.raises(ValueError):
        enc.encode([])


def test_bf16_fp16_and_short_t5(tmp_path, t5_sd, clip_sd):
    t5p, clipp = tf.save(t5_sd, tmp_path / "t5.safetensors"), tf.save(clip_sd, tmp_path / "clip.safetensors")
    ref_txt, ref_vec = load_text_encoders(t5p, clipp, dtype=torch.float32).encode(PROMPTS[:2])
    for dtype, tol in ((torch.bfloat16, 0.1), (torch.float16, 0.02)):
        enc = load_text_encoders(t5p, clipp, dtype=dtype)
        txt, vec = enc.encode(PROMPTS[:2])
        assert txt.dtype == vec.dtype == dtype
        assert maxdiff(txt, ref_txt) < tol * ref_txt.abs().max() and maxdiff(vec, ref_vec) < tol * ref_vec.abs().max()
    wo = enc.t5.encoder.block[0].layer[1].DenseReluDense.wo.weight
    assert wo.dtype == torch.float32  # kept wide in fp16, as T5-XXL needs
    short = load_text_encoders(t5p, clipp, dtype=torch.float32, t5_max_length=256).encode(PROMPTS[0])[0]
    assert short.shape == (1, 256, 64)


def test_random_text_encoders_for_demo_mode():
    enc = random_text_encoders(TINY_T5, TINY_CLIP, dtype=torch.float32)
    txt, vec = enc.encode(["a", "b"])
    assert txt.shape == (2, 512, TINY_T5.d_model) and vec.shape == (2, TINY_CLIP.hidden_size)
    assert torch.isfinite(txt).all() and not torch.allclose(vec[0], vec[1])


# --- bad input ------------------------------------------------------------------------------------------

def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError) as err:
        load_t5(tmp_path / "t5xxl_fp16.safetensors")
    assert "t5xxl_fp16.safetensors" in str(err.value) and "does not exist" in str(err.value)


def test_wrong_family(tmp_path, t5_sd, clip_sd):
    clip_file = tf.save(clip_sd, tmp_path / "clip_l.safetensors")
    t5_file = tf.save(t5_sd, tmp_path / "t5.safetensors")
    with pytest.raises(CheckpointError) as err:
        load_t5(clip_file)
    msg = str(err.value)
    assert str(clip_file) in msg and "not a T5" in msg and "CLIP text encoder" in msg and "swapped" in msg
    assert "encoder.block.0.layer.0.SelfAttention.q.weight" in msg
    with pytest.raises(CheckpointError, match="not a CLIP text encoder.*found: a T5 text encoder"):
        load_clip(t5_file)
    vae = tf.save({"decoder.conv_in.weight": torch.zeros(4, 4, 3, 3)}, tmp_path / "ae.safetensors")
    with pytest.raises(CheckpointError, match="found: an autoencoder"):
        load_t5(vae)


def test_shape_mismatch(tmp_path, t5_sd, clip_sd):
    bad = dict(t5_sd)
    key = "encoder.block.1.layer.1.DenseReluDense.wo.weight"
    bad[key] = bad[key].t().contiguous()
    path = tf.save(bad, tmp_path / "t5_bad.safetensors")
    with pytest.raises(CheckpointError) as err:
        load_t5(path)
    msg = str(err.value)
    assert str(path) in msg and key in msg and "[128, 64]" in msg and "[64, 128]" in msg

    bad = dict(t5_sd)
    bad["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = torch.zeros(32, 3)
    with pytest.raises(CheckpointError, match="divisible by the number of heads"):
        load_t5(tf.save(bad, tmp_path / "t5_heads.safetensors"))

    partial = {k: v for k, v in clip_sd.items() if "layers.1." not in k or "fc2" not in k}
    with pytest.raises(CheckpointError, match="incomplete.*layers.1.mlp.fc2"):
        load_clip(tf.save(partial, tmp_path / "clip_partial.safetensors"))
