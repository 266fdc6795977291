"""Tokenizers: load any Hugging Face tokenizer directory, or train the built-in byte-level BPE.

Encoding goes through the `tokenizers` (Rust) backend with special tokens off; the document
framing is added here so that it is the same for every family: the BOS token first when the
tokenizer's own post-processor adds one (the family's convention: Llama yes, Qwen no), then
the text, then the end-of-document token.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from l2a_common import UserError

# Files of a HF tokenizer directory worth copying next to the shards (model weights are not).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
)
BUILTIN_SPECIALS = {"eos_token": "<|endoftext|>", "bos_token": "<|startoftext|>", "pad_token": "<|pad|>"}
# Qwen2/Qwen3's pre-tokenizer split: digits one by one, which suits code.
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
BUILTIN_VERSION = 1  # bump when the training recipe changes: invalidates cached tokenizers


@dataclass(frozen=True)
class TokenizerInfo:
    """What packing needs and what the manifest records."""

    path: str            # the tokenizer directory used
    name: str
    sha256: str          # over the tokenizer files, so a changed tokenizer is detected
    vocab_size: int
    bos_token_id: int | None
    eos_token_id: int
    pad_token_id: int
    add_bos: bool

    def manifest(self) -> dict:
        return asdict(self)


def _files_sha256(directory: Path) -> str:
    digest = hashlib.sha256()
    for name in TOKENIZER_FILES:
        path = directory / name
        if path.is_file():
            digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


@dataclass(frozen=True)
class _Directory:
    """A tokenizer directory as packing needs it: the Rust backend and the special tokens."""

    backend: object  # tokenizers.Tokenizer
    bos_token: str | None
    eos_token: str | None
    pad_token: str | None
    add_bos_token: bool | None  # the directory's explicit setting, if it has one


def _content(token) -> str | None:
    return token.get("content") if isinstance(token, dict) else token  # saved AddedTokens are dicts


@functools.lru_cache(maxsize=4)
def _read(path: str, sha256: str) -> _Directory:
    """Read with `tokenizers` alone when the directory has tokenizer.json: importing transformers
    (and torch with it) takes ~2 s, a tenth of a prep of 15M tokens on 2 cores. A directory with
    only slow-tokenizer files goes through transformers, which converts it."""
    directory = Path(path)
    if (directory / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        config = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the config wins
            if (directory / name).is_file():
                config.update(json.loads((directory / name).read_text(encoding="utf-8")))
        add_bos = config.get("add_bos_token")
        return _Directory(
            backend=Tokenizer.from_file(str(directory / "tokenizer.json")),
            bos_token=_content(config.get("bos_token")),
            eos_token=_content(config.get("eos_token")),
            pad_token=_content(config.get("pad_token")),
            add_bos_token=add_bos if isinstance(add_bos, bool) else None,
        )
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if not getattr(tok, "is_fast", False):
        raise UserError(f"tokenizer.path='{path}': no fast (tokenizers) backend could be built for it")
    return _Directory(tok.backend_tokenizer, tok.bos_token, tok.eos_token, tok.pad_token, None)


def _token_id(tok: _Directory, token: str, setting: str, path: str) -> int:
    token_id = tok.backend.token_to_id(token)
    if token_id is None:
        raise UserError(f"{setting}='{token}' is not a token of the tokenizer at {path}")
    return int(token_id)


def load(path: str, eos_token: str | None, add_bos: bool | None) -> TokenizerInfo:
    """Inspect a HF tokenizer directory: special ids and the family's BOS convention."""
    directory = Path(path)
    if not directory.is_dir():
        raise UserError(
            f"tokenizer.path='{path}' does not exist or is not a directory; give the model's "
            "tokenizer directory (with tokenizer.json or tokenizer_config.json), or tokenizer.path=null "
            "for the built-in BPE"
        )
    try:
        tok = _read(str(directory), _files_sha256(directory))
    except UserError:
        raise
    except Exception as err:  # tokenizers / transformers raise many types; the message is what matters
        raise UserError(f"tokenizer.path='{path}': cannot load a Hugging Face tokenizer ({err})") from err
    eos = eos_token or tok.eos_token
    if eos is None:
        raise UserError(
            f"tokenizer.path='{path}' defines no eos_token; set tokenizer.eos_token to the token that "
            "ends a document (e.g. '<|endoftext|>')"
        )
    eos_id = _token_id(tok, eos, "tokenizer.eos_token", path)
    bos_id = None if tok.bos_token is None else _token_id(tok, tok.bos_token, "bos_token", path)
    if add_bos is None:  # the family's convention: the directory's setting, else what its post-processor does
        if tok.add_bos_token is not None:
            add_bos = tok.add_bos_token and bos_id is not None
        else:
            with_special = tok.backend.encode("a", add_special_tokens=True).ids
            add_bos = bos_id is not None and len(with_special) > 0 and with_special[0] == bos_id
    elif add_bos and bos_id is None:
        raise UserError(f"tokenizer.add_bos=true but the tokenizer at '{path}' has no bos_token")
    pad_id = eos_id if tok.pad_token is None else _token_id(tok, tok.pad_token, "pad_token", path)
    return TokenizerInfo(
        path=str(directory),
        name=directory.resolve().name or str(directory),
        sha256=_files_sha256(directory),
        vocab_size=tok.backend.get_vocab_size(with_added_tokens=True),
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=int(pad_id),
        add_bos=bool(add_bos),
    )


def fingerprint(path: str | Path) -> dict:
    """What makes two tokenizer directories the same tokenizer: a hash of the token -> id map
    (added tokens included). Unlike `sha256` of the files it survives a re-save
    (`save_pretrained` rewrites tokenizer_config.json), so a model's tokenizer and the one its
    data were prepared with can be compared. Special-token settings are left out on purpose: a
    base and an instruct tokenizer of one family share the map and differ in eos_token, and
    data tokenized with either means the same to the model."""
    directory = Path(path)
    vocab = _read(str(directory), _files_sha256(directory)).backend.get_vocab(with_added_tokens=True)
    digest = hashlib.sha256(json.dumps(sorted(vocab.items(), key=lambda kv: kv[1]), ensure_ascii=False).encode())
    return {"vocab_sha256": digest.hexdigest(), "vocab_size": len(vocab)}


def has_tokenizer(path: str | Path) -> bool:
    directory = Path(path)
    return (directory / "tokenizer.json").is_file() or (directory / "tokenizer_config.json").is_file()


def mismatch(data_tokenizer: str | Path, model_tokenizer: str | Path) -> str | None:
    """None if both directories hold the same tokenizer, else how they differ, in a few words."""
    a, b = fingerprint(data_tokenizer), fingerprint(model_tokenizer)
    if a == b:
        return None
    return (f"the data's tokenizer has {a['vocab_size']} tokens (vocabulary {a['vocab_sha256'][:12]}), "
            f"the model's {b['vocab_size']} (vocabulary {b['vocab_sha256'][:12]})")


def backend_json(path: str) -> str:
    """The Rust tokenizer serialised, to rebuild it cheaply in worker processes."""
    return _read(path, _files_sha256(Path(path))).backend.to_str()


def copy_files(src: str, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copyfile(Path(src) / name, dst / name)


class Encoder:
    """Text -> int32 token ids of a framed document: [BOS] text EOS."""

    def __init__(self, tokenizer_json: str, bos_id: int | None, eos_id: int, add_bos: bool, threads: bool):
        if not threads:  # worker processes: one Rust thread each (the parent's setting is the user's)
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_str(tokenizer_json)
        self.prefix = [bos_id] if add_bos else []
        self.eos_id = eos_id
        encode = getattr(self.tokenizer, "encode_batch_fast", None)  # no offsets: faster (tokenizers>=0.21)
        self._encode = encode or self.tokenizer.encode_batch

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        out = []
        for enc in self._encode(texts, add_special_tokens=False):
            body = enc.ids  # a new Python list on every access: take it once
            ids = np.empty(len(body) + len(self.prefix) + 1, dtype=np.int32)
            ids[len(self.prefix) : -1] = body
            ids[: len(self.prefix)] = self.prefix
            ids[-1] = self.eos_id
            out.append(ids)
        return out


def train_builtin(texts: Iterable[str], vocab_size: int, cache_dir: str) -> str:
    """Train (or reuse from the cache) the built-in byte-level BPE; returns its directory.

    The cache key is the hash of the training text and recipe, so a second prep of the same
    corpus reuses the tokenizer instead of training again, and a different corpus cannot.
    """
    sample = "\x00".join(texts)
    key = hashlib.sha256(f"{BUILTIN_VERSION}:{vocab_size}:{json.dumps(BUILTIN_SPECIALS)}:".encode())
    key.update(sample.encode("utf-8", errors="surrogatepass"))
    directory = Path(cache_dir) / f"bpe-{vocab_size}-{key.hexdigest()[:16]}"
    if (directory / "tokenizer.json").is_file():
        return str(directory)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(BUILTIN_SPECIALS.values())
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(pattern=__import__("tokenizers").Regex(SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(sample.split("\x00"), trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, **BUILTIN_SPECIALS)
    tmp = directory.with_name(directory.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    wrapped.save_pretrained(str(tmp))
    if directory.exists():  # a concurrent prep finished first: same key, same content
        shutil.rmtree(tmp)
    else:
        tmp.rename(directory)
    return str(directory)
