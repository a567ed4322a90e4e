"""The real CLIP BPE tokenizer, built offline.

Stable Diffusion's tokenizer cannot be downloaded on the machines we build on, but the ``open-clip-torch``
wheel ships the exact BPE merges OpenAI's CLIP was trained with. Rebuilding the vocabulary from them the way
``open_clip.tokenizer.SimpleTokenizer`` does gives the same 49408 ids as ``openai/clip-vit-large-patch14``.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from spurgen.errors import SpurgenError

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

__all__ = ["CLIP_MAX_LENGTH", "CLIP_VOCAB_SIZE", "build_clip_tokenizer", "write_bpe_files"]

CLIP_VOCAB_SIZE = 49408
CLIP_MAX_LENGTH = 77
_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
# CLIP keeps 49152 - 256 - 2 merges: the vocabulary is 256 bytes x 2 (with/without "</w>"), the merges,
# and 2 special tokens, 49408 in all. Line 0 of the file is a version header.
_N_MERGES = 49152 - 256 - 2
# A prompt and its ids under OpenAI's CLIP tokenizer (as open_clip's SimpleTokenizer gives them).
_CHECK_TEXT = "a photo of sks hummingbird"
_CHECK_IDS = [49406, 320, 1125, 539, 48136, 33072, 49407]


def _bpe_path() -> Path:
    """Locate the BPE file inside the installed open_clip package, without importing it.

    Importing open_clip pulls in timm and torchvision (seconds); only its data file is needed.
    """
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise SpurgenError(
            "the CLIP tokenizer needs the BPE file from open-clip-torch, which is not installed: "
            "pip install open-clip-torch"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / _BPE_FILE
        if path.is_file():
            return path
    raise SpurgenError(
        f"open-clip-torch is installed but has no {_BPE_FILE}: pip install --force-reinstall open-clip-torch"
    )


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable unicode characters; its order fixes ids 0..255."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


@functools.lru_cache(maxsize=1)
def _vocab_and_merges() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """Return CLIP's token->id map and merge list, cached since decoding the file takes a while."""
    with gzip.open(_bpe_path()) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = tuple(tuple(line.split()) for line in lines[1 : _N_MERGES + 1])
    byte_chars = list(_bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars]
    tokens += ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != CLIP_VOCAB_SIZE or any(len(m) != 2 for m in merges):
        raise SpurgenError(
            f"{_BPE_FILE} from open-clip-torch gave {len(vocab)} tokens, not {CLIP_VOCAB_SIZE}: "
            "pip install --force-reinstall open-clip-torch"
        )
    return vocab, merges  # type: ignore[return-value]


def write_bpe_files(folder: Path) -> None:
    """Write CLIP's ``vocab.json`` and ``merges.txt`` into ``folder``, as a hub tokenizer folder has them.

    ``tokenizer.json`` alone suffices for transformers 5; the two files let older transformers (whose
    ``CLIPTokenizer`` is the slow, file-based one) load the folder too.

    Args:
        folder: an existing folder.
    """
    vocab, merges = _vocab_and_merges()
    folder = Path(folder)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )


def build_clip_tokenizer(save_dir: Path | None = None) -> CLIPTokenizer:
    """Build Stable Diffusion 1.x's CLIP tokenizer (49408 tokens, 77 positions) from open_clip's BPE file.

    Args:
        save_dir: if given, the tokenizer is also saved there with ``save_pretrained``, plus ``vocab.json``
            and ``merges.txt`` (for example as the ``tokenizer/`` subfolder of a diffusers pipeline folder).

    Returns:
        The tokenizer; its pad token is ``<|endoftext|>`` as in SD 1.x.

    Raises:
        SpurgenError: open-clip-torch is missing or its BPE file is not the expected one.
    """
    # Imported here, not at the top: the builders import this module's constants, transformers takes seconds.
    import transformers
    from transformers import CLIPTokenizer

    vocab, merges = _vocab_and_merges()
    # Built from the in-memory vocab and merges, not from files: in transformers 5,
    # CLIPTokenizer(vocab_file=..., merges_file=...) silently ignores the files and builds a 2-token
    # tokenizer, and from_pretrained(tmp_dir) would leave the deleted temp paths in init_kwargs. Both give
    # the same backend tokenizer.
    special = {"model_max_length": CLIP_MAX_LENGTH, "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
               "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    if int(transformers.__version__.split(".")[0]) >= 5:
        tokenizer = CLIPTokenizer(vocab=dict(vocab), merges=list(merges), **special)
    else:  # transformers 4 (the floor, 4.45): the slow tokenizer reads both files at construction
        with tempfile.TemporaryDirectory() as tmp:
            write_bpe_files(Path(tmp))
            tokenizer = CLIPTokenizer(vocab_file=f"{tmp}/vocab.json", merges_file=f"{tmp}/merges.txt", **special)
    # Guards against a transformers release that changes how CLIPTokenizer reads vocab/merges again.
    ids = tokenizer(_CHECK_TEXT).input_ids
    decoded = tokenizer.decode(ids, skip_special_tokens=True)
    if len(tokenizer) != CLIP_VOCAB_SIZE or ids != _CHECK_IDS or decoded != _CHECK_TEXT:
        raise SpurgenError(
            f"the CLIP tokenizer built from {_BPE_FILE} has {len(tokenizer)} tokens and encodes "
            f"{_CHECK_TEXT!r} as {ids}, not CLIP's {_CHECK_IDS}: pip install 'transformers>=5,<5.24'"
        )
    if save_dir is not None:
        save_dir = Path(save_dir)
        save_dir.mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(str(save_dir))
        write_bpe_files(save_dir)
    return tokenizer
