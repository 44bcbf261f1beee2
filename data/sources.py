"""Where documents come from: the embedded stdlib corpus, local files, or the Hugging Face hub.

Every source becomes a `datasets.Dataset` with one document per row in a `text` column, in a
deterministic order. Undecodable bytes are replaced (U+FFFD) and counted, never fatal. Reading streams:
documents are taken one at a time from the (memory-mapped) table, so a corpus that is one 48 MB line costs
what its bytes cost (the tokenizer sees it in pieces: `tokenizer.pieces`). `datasets` writes its cache where
prepare tells it (the run's temporary folder), never into the user's home.
"""

import errno
import gzip
import hashlib
import json
import re
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import datasets

from .shards import DataError

REPLACEMENT = "\ufffd"
LOCAL_SUFFIXES = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
# Folders of the standard library that are not its own source: installed packages and test suites.
HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")  # "name" or "owner/name"
STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
JSON_KINDS = {bool: "a boolean", int: "a number", float: "a number", dict: "an object", list: "an array"}
DISK_FULL = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large",
}


@dataclass
class Corpus:
    documents: datasets.Dataset  # column "text", one document per row (empty ones included, skipped by texts())
    description: str  # what the manifest records as the source
    replaced_characters: int  # U+FFFD characters in the text (from undecodable bytes)
    count: int = 0  # non-empty documents
    characters: int = 0  # in them


def stdlib_files() -> list[Path]:
    """The running interpreter's standard library .py files, sorted by path relative to its root."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if not STDLIB_SKIP_DIRS.intersection(p.relative_to(root).parts[:-1])]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def load_stdlib() -> Corpus:
    texts = [path.read_bytes().decode("utf-8", errors="replace") for path in stdlib_files()]
    version = ".".join(map(str, sys.version_info[:3]))
    return Corpus(
        datasets.Dataset.from_dict({"text": texts}),
        f"stdlib: Python {version} standard library ({len(texts)} .py files)",
        0,
    )


def _looks_like_a_file(source: str) -> bool:
    return any(source.endswith(suffix) or source.endswith(suffix + ".gz") for suffix in LOCAL_SUFFIXES)


def _local_format(path: Path) -> str:
    suffixes = [s for s in path.suffixes if s != ".gz"]
    builder = LOCAL_SUFFIXES.get(suffixes[-1] if suffixes else "")
    if builder is None:
        raise DataError(f"{path}: unsupported file type; use .txt, .txt.gz, .jsonl(.gz) or .parquet")
    return builder


def local_files(path: Path) -> list[Path]:
    """The files a local --source stands for: itself, or a folder's regular files (not hidden), sorted.
    A FIFO or device is refused: reading one would block or never end."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        if not files:
            raise DataError(f"{path}: folder has no files; point --source at .txt/.jsonl/.parquet files")
        return files
    if not path.is_file():
        raise DataError(f"--source {path}: not a regular file or folder; give a .txt/.jsonl/.parquet file or a folder")
    return [path]


def source_files(source: str) -> list[Path] | None:
    """What a --source reads from this machine (None for a hub dataset), checked cheaply before any work."""
    if source == "stdlib":
        return stdlib_files()
    if Path(source).exists() or Path(source).is_symlink():
        files = local_files(Path(source))
        for f in files:
            _local_format(f)
        return files
    if HUB_NAME.fullmatch(source) and not _looks_like_a_file(source):
        return None
    raise DataError(f"--source {source}: no such file or folder (and not a hub dataset name)")


def source_sha256(source: str, files: list[Path]) -> str:
    """The identity of a local corpus: every file's name (in the --source folder), size and bytes, in order."""
    digest = hashlib.sha256()
    root = Path(sysconfig.get_paths()["stdlib"]) if source == "stdlib" else Path(source)
    root = root if root.is_dir() else root.parent
    for path in files:
        digest.update(f"{path.relative_to(root).as_posix()}\0{path.stat().st_size}\0".encode())
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()


def load_local(path: Path, text_field: str, sample_by: str, cache_dir: Path | None = None) -> Corpus:
    files = local_files(path)
    formats = {_local_format(f) for f in files}
    if len(formats) > 1:
        raise DataError(f"{path}: mixes file types {sorted(formats)}; prepare each type separately")
    builder = formats.pop()
    kwargs = {"sample_by": sample_by, "encoding_errors": "replace"} if builder == "text" else {}
    cache = {"cache_dir": str(cache_dir)} if cache_dir is not None else {}
    try:
        ds = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train", **kwargs, **cache)
    except Exception as error:  # datasets wraps parse errors in several types; report the file, not a trace
        if disk_full(error) is not None:
            raise
        raise _where_not_text(files, text_field) or DataError(
            f"{path}: could not be read as {builder}: {str(error).splitlines()[0]}"
        ) from None
    ds = _text_column(ds, text_field, path)
    if not _is_text(ds.features["text"]):
        raise _where_not_text(files, text_field) or DataError(
            f"{path}: field {text_field!r} holds {_kind(ds.features['text'])}, not text; pass --text-field NAME "
            f"of a text field"
        )
    return Corpus(ds, f"local: {path.resolve().name} ({len(files)} file(s), {builder}, by {sample_by})", 0)


def _is_text(feature: object) -> bool:
    return isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")


def _kind(feature: object) -> str:
    if isinstance(feature, datasets.Value):
        return f"{feature.dtype} values"
    return "objects" if isinstance(feature, dict) else f"{type(feature).__name__} values"


def _where_not_text(files: list[Path], text_field: str) -> DataError | None:
    """The first line of a JSON Lines file whose row is not JSON or whose text is not a string (a number, an
    object...): `datasets` only says a column's type, or that some block failed to parse."""
    for path in files:
        if [s for s in path.suffixes if s != ".gz"][-1:] != [".jsonl"]:
            continue
        with (gzip.open if path.suffix == ".gz" else open)(path, "rt", encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, 1):  # one line at a time: a long one costs its own bytes
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as error:
                    return DataError(f"{path}: line {number}: not valid JSON ({error}); fix or remove that line")
                value = row.get(text_field) if isinstance(row, dict) else None
                if not isinstance(row, dict) or not isinstance(value, str | None):
                    kind = JSON_KINDS.get(type(value), type(value).__name__)
                    what = f"field {text_field!r} is {kind}" if isinstance(row, dict) else "not a JSON object"
                    return DataError(
                        f"{path}: line {number}: {what}, not text; fix that line or pass --text-field NAME of "
                        f"a text field"
                    )
    return None


def load_hub(
    name: str,
    config: str | None,
    split: str,
    text_field: str,
    streaming: bool,
    max_documents: int | None,
    cache_dir: Path | None = None,
) -> Corpus:
    """A hub dataset (needs network). Streaming reads only the first max_documents documents."""
    cache = {"cache_dir": str(cache_dir)} if cache_dir is not None else {}
    ds = datasets.load_dataset(name, config, split=split, streaming=streaming, **cache)
    if streaming:
        rows = ds.take(max_documents) if max_documents else ds
        ds = datasets.Dataset.from_list([{"text": row[text_field]} for row in rows])
    else:
        ds = _text_column(ds, text_field, name)
        if max_documents:
            ds = ds.select(range(min(max_documents, len(ds))))
    if not _is_text(ds.features["text"]):
        raise DataError(f"--source {name}: field {text_field!r} is not text; pass --text-field NAME of a text field")
    return Corpus(ds, f"hub: {name}" + (f"/{config}" if config else "") + f" split {split}", 0)


def _text_column(ds: datasets.Dataset, text_field: str, where: Path | str) -> datasets.Dataset:
    if text_field not in ds.column_names:
        raise DataError(f"{where}: no field {text_field!r} (fields: {ds.column_names}); pass --text-field NAME")
    ds = ds.select_columns([text_field])
    return ds.rename_column(text_field, "text") if text_field != "text" else ds


def texts(documents: datasets.Dataset) -> Iterator[str]:
    """Each non-empty text of the first column, one at a time: arrow batches are zero-copy slices of the
    memory-mapped table, so only the current document is held as a Python string."""
    for batch in documents.with_format("arrow").iter(batch_size=256):
        for value in batch.column(0):
            text = value.as_py()
            if text and not text.isspace():
                yield text


def disk_full_reason(full: OSError) -> str:
    """What a disk-full error says, in a few words."""
    return DISK_FULL.get(full.errno, str(full).splitlines()[0][:120])


def disk_full(error: BaseException) -> OSError | None:
    """The disk-full error somewhere in an exception's chain (`datasets` wraps the OSError of a write)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        text = str(error)
        if isinstance(error, OSError) and (
            error.errno in DISK_FULL or "No space left" in text or "File too large" in text or "quota" in text
        ):
            return error
        error = error.__cause__ or error.__context__
    return None


def load_corpus(
    source: str,
    text_field: str = "text",
    sample_by: str = "paragraph",
    hub_config: str | None = None,
    hub_split: str = "train",
    streaming: bool = False,
    max_documents: int | None = None,
    cache_dir: Path | None = None,
) -> Corpus:
    """`stdlib`, an existing local path, or else a hub dataset name; counted in one pass (empty documents
    are not counted, and are skipped by `texts`)."""
    if source_files(source) is None:
        try:
            corpus = load_hub(source, hub_config, hub_split, text_field, streaming, max_documents, cache_dir)
        except DataError:
            raise
        except Exception as error:  # offline, unknown name, gated...: one line, not a trace
            if disk_full(error) is not None:
                raise
            raise DataError(
                f"--source {source}: not a local path, and loading it from the Hugging Face hub "
                f"failed: {str(error).splitlines()[0] if str(error) else type(error).__name__}"
            ) from error
    elif source == "stdlib":
        corpus = load_stdlib()
    else:
        corpus = load_local(Path(source), text_field, sample_by, cache_dir)
    for text in texts(corpus.documents):
        corpus.count += 1
        corpus.characters += len(text)
        corpus.replaced_characters += text.count(REPLACEMENT)
    if corpus.count == 0:
        raise DataError(f"--source {source}: the corpus has no non-empty documents")
    return corpus
