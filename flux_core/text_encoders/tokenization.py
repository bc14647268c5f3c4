"""Tokenizers for T5 and CLIP from their standard files, and where those files are found.

T5: SentencePiece-unigram `tokenizer.json`, run by the `tokenizers` library; prompt ids, then </s>, then
<pad> up to the fixed length (FLUX dev uses 512). CLIP: byte-level BPE from `vocab.json` + `merges.txt`
(lower-cased); <|startoftext|>, ids, <|endoftext|>, padded with <|endoftext|> to 77. Both truncate
the prompt so the end token always survives, as the reference pipeline does.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import TokenizerFilesMissing

T5_FILES = ("tokenizer.json",)
CLIP_FILES = ("vocab.json", "merges.txt")
# Sub-folders of a tokenizer root, per layout: ComfyUI source tree, ComfyUI's folders copied out,
# diffusers model folder, plain names.
T5_LAYOUTS = ("comfy/text_encoders/t5_tokenizer", "t5_tokenizer", "tokenizer_2", "t5")
CLIP_LAYOUTS = ("comfy/sd1_tokenizer", "sd1_tokenizer", "tokenizer", "clip")
ENV_VAR = "FLUX_TOKENIZER_DIR"

# CLIP's pre-tokenization: its special tokens, English contractions, letter runs, single digits,
# and runs of other symbols; whitespace is dropped.
_CLIP_SPLIT = (r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]"
               r"|[^\s\p{L}\p{N}]+")


class _FixedLengthTokenizer:
    """Prompts to (B, max_length) id tensors: each subclass frames and pads one row its own way."""

    _tok = None
    max_length: int

    def ids(self, prompt: str) -> list[int]:
        """The prompt's ids without special tokens or padding."""
        return self._tok.encode(prompt, add_special_tokens=False).ids

    def _row(self, ids: list[int], n: int) -> list[int]:  # pragma: no cover - interface
        raise NotImplementedError

    def __call__(self, prompts: list[str], max_length: int | None = None) -> torch.Tensor:
        n = max_length or self.max_length
        encoded = self._tok.encode_batch(list(prompts), add_special_tokens=False)
        return torch.tensor([self._row(e.ids, n) for e in encoded], dtype=torch.long)


class T5Tokenizer(_FixedLengthTokenizer):
    def __init__(self, folder: Path, max_length: int = 512):
        import tokenizers

        self.folder = Path(folder)
        self.max_length = max_length
        self._tok = tokenizers.Tokenizer.from_file(str(self.folder / "tokenizer.json"))
        self.eos_id = self._tok.token_to_id("</s>")
        self.pad_id = self._tok.token_to_id("<pad>")
        if self.eos_id is None or self.pad_id is None:
            raise TokenizerFilesMissing(f"{self.folder / 'tokenizer.json'} is not a T5 tokenizer: it has no "
                                        "'</s>' or '<pad>' token")

    def _row(self, ids: list[int], n: int) -> list[int]:
        ids = ids[: n - 1] + [self.eos_id]
        return ids + [self.pad_id] * (n - len(ids))


class CLIPTokenizer(_FixedLengthTokenizer):
    def __init__(self, folder: Path, max_length: int = 77):
        from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers
        from tokenizers.models import BPE

        self.folder = Path(folder)
        self.max_length = max_length
        # "</w>" marks a word's last piece: CLIP's vocabulary distinguishes "cat</w>" from "cat"
        model = BPE.from_file(str(self.folder / "vocab.json"), str(self.folder / "merges.txt"),
                              continuing_subword_prefix="", end_of_word_suffix="</w>",
                              unk_token="<|endoftext|>", fuse_unk=False)
        tok = Tokenizer(model)
        tok.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ])
        # the literal markers in a prompt map to their ids, as in the reference tokenizer
        tok.add_special_tokens([AddedToken("<|startoftext|>", normalized=True, special=True),
                                AddedToken("<|endoftext|>", normalized=False, special=True)])
        self._tok = tok
        self.bos_id = tok.token_to_id("<|startoftext|>")
        self.eos_id = tok.token_to_id("<|endoftext|>")
        if self.bos_id is None or self.eos_id is None:
            raise TokenizerFilesMissing(f"{self.folder / 'vocab.json'} is not a CLIP vocabulary: it has no "
                                        "'<|startoftext|>' or '<|endoftext|>' token")

    def _row(self, ids: list[int], n: int) -> list[int]:
        ids = [self.bos_id] + ids[: n - 2] + [self.eos_id]
        return ids + [self.eos_id] * (n - len(ids))  # CLIP pads with end-of-text


@dataclass
class Tokenizers:
    t5: T5Tokenizer
    clip: CLIPTokenizer

    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.t5(prompts), self.clip(prompts)


# --- finding the files -------------------------------------------------------------------------------

def repo_root() -> Path:
    """The folder holding the flux_core package (a checkout, or a custom node's folder)."""
    return Path(__file__).resolve().parents[2]


def _comfy_roots() -> list[Path]:
    """Roots of an installed ComfyUI, found without importing it (importing comfy has side effects)."""
    roots: list[Path] = []
    try:
        spec = importlib.util.find_spec("comfy")
    except (ImportError, ValueError):
        spec = None
    if spec is not None:
        # ComfyUI's comfy/ has no __init__.py, so it is usually a namespace package without an origin
        locations = list(spec.submodule_search_locations or [])
        if spec.origin and spec.origin not in ("namespace", "built-in"):
            locations.append(str(Path(spec.origin).parent))
        roots += [Path(loc).parent for loc in locations]
    for entry in sys.path:
        if entry and (Path(entry) / "comfy" / "sd1_tokenizer").is_dir():
            roots.append(Path(entry))
    return roots


def search_roots(tokenizer_dir=None) -> list[tuple[Path, str]]:
    """(folder, why it is searched), in order. An explicit folder is the only one searched."""
    if tokenizer_dir is not None:
        return [(Path(os.fspath(tokenizer_dir)).expanduser(), "the tokenizer_dir given")]
    out = []
    env = os.environ.get(ENV_VAR)
    if env:
        out.append((Path(env).expanduser(), f"${ENV_VAR}"))
    out += [(root, "the installed ComfyUI") for root in _comfy_roots()]
    out.append((repo_root() / ".cache" / "comfyui", "this project's ComfyUI copy"))
    seen, unique = set(), []
    for path, why in out:
        key = os.path.normcase(os.path.abspath(path))
        if key not in seen:
            seen.add(key)
            unique.append((path, why))
    return unique


def _find(roots, layouts, files) -> tuple[Path | None, list[Path]]:
    looked = []
    for root, _why in roots:
        for sub in layouts:
            folder = root / sub
            looked.append(folder)
            if all((folder / f).is_file() for f in files):
                return folder, looked
    return None, looked


def find_tokenizer_folders(tokenizer_dir=None) -> tuple[Path, Path]:
    """(T5 folder, CLIP folder); TokenizerFilesMissing lists every place looked and the files expected."""
    roots = search_roots(tokenizer_dir)
    t5, t5_looked = _find(roots, T5_LAYOUTS, T5_FILES)
    clip, clip_looked = _find(roots, CLIP_LAYOUTS, CLIP_FILES)
    if t5 is not None and clip is not None:
        return t5, clip
    lines = ["tokenizer files not found."]
    if t5 is None:
        lines.append(f"T5 needs {' + '.join(T5_FILES)} in one of:")
        lines += [f"  {p}" for p in t5_looked]
    if clip is None:
        lines.append(f"CLIP needs {' + '.join(CLIP_FILES)} in one of:")
        lines += [f"  {p}" for p in clip_looked]
    lines.append("Searched roots: " + "; ".join(f"{p} ({why})" for p, why in roots) + ".")
    lines.append(f"Pass tokenizer_dir=, or set ${ENV_VAR}, to a folder laid out like ComfyUI "
                 "(comfy/text_encoders/t5_tokenizer, comfy/sd1_tokenizer), like diffusers "
                 "(tokenizer_2/, tokenizer/), or with t5/ and clip/ sub-folders; ComfyUI ships these files.")
    raise TokenizerFilesMissing("\n".join(lines))


@functools.lru_cache(maxsize=8)
def _cached(kind: str, folder: str, max_length: int):
    cls = T5Tokenizer if kind == "t5" else CLIPTokenizer
    return cls(Path(folder), max_length)


def load_tokenizers(tokenizer_dir=None, t5_max_length: int = 512, clip_max_length: int = 77) -> Tokenizers:
    """Both tokenizers; building them takes a moment, so each folder is read once per process."""
    t5_dir, clip_dir = find_tokenizer_folders(tokenizer_dir)
    return Tokenizers(_cached("t5", str(t5_dir.resolve()), t5_max_length),
                      _cached("clip", str(clip_dir.resolve()), clip_max_length))
