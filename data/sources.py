"""Where documents come from: the embedded stdlib corpus, local files, or the Hugging Face hub.

Every source becomes a `datasets.Dataset` with one document per row in a `text` column, in a
deterministic order. Undecodable bytes are replaced (U+FFFD) and counted, never fatal.
"""

import re
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import datasets

from .shards import DataError

REPLACEMENT = "\ufffd"
LOCAL_SUFFIXES = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
# Folders of the standard library that are not its own source: installed packages and test suites.
HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")  # "name" or "owner/name"
STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


@dataclass
class Corpus:
    documents: datasets.Dataset  # column "text", one document per row
    description: str  # what the manifest records as the source
    replaced_characters: int  # U+FFFD characters in the text (from undecodable bytes)


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
        sum(t.count(REPLACEMENT) for t in texts),
    )


def _looks_like_a_file(source: str) -> bool:
    return any(source.endswith(suffix) or source.endswith(suffix + ".gz") for suffix in LOCAL_SUFFIXES)


def _local_format(path: Path) -> str:
    suffixes = [s for s in path.suffixes if s != ".gz"]
    builder = LOCAL_SUFFIXES.get(suffixes[-1] if suffixes else "")
    if builder is None:
        raise DataError(f"{path}: unsupported file type; use .txt, .txt.gz, .jsonl(.gz) or .parquet")
    return builder


def load_local(path: Path, text_field: str, sample_by: str) -> Corpus:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        if not files:
            raise DataError(f"{path}: folder has no files; point --source at .txt/.jsonl/.parquet files")
    else:
        files = [path]
    formats = {_local_format(f) for f in files}
    if len(formats) > 1:
        raise DataError(f"{path}: mixes file types {sorted(formats)}; prepare each type separately")
    builder = formats.pop()
    kwargs = {"sample_by": sample_by, "encoding_errors": "replace"} if builder == "text" else {}
    try:
        ds = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train", **kwargs)
    except Exception as error:  # datasets wraps parse errors in several types; report the file, not a trace
        raise DataError(f"{path}: could not be read as {builder}: {str(error).splitlines()[0]}") from error
    ds = _text_column(ds, text_field, path)
    replaced = sum(batch.count(REPLACEMENT) for batch in _texts(ds))
    return Corpus(ds, f"local: {path.resolve().name} ({len(files)} file(s), {builder}, by {sample_by})", replaced)


def load_hub(
    name: str, config: str | None, split: str, text_field: str, streaming: bool, max_documents: int | None
) -> Corpus:
    """A hub dataset (needs network). Streaming reads only the first max_documents documents."""
    ds = datasets.load_dataset(name, config, split=split, streaming=streaming)
    if streaming:
        rows = ds.take(max_documents) if max_documents else ds
        ds = datasets.Dataset.from_list([{"text": row[text_field]} for row in rows])
    else:
        ds = _text_column(ds, text_field, name)
        if max_documents:
            ds = ds.select(range(min(max_documents, len(ds))))
    return Corpus(
        ds,
        f"hub: {name}" + (f"/{config}" if config else "") + f" split {split}",
        sum(batch.count(REPLACEMENT) for batch in _texts(ds)),
    )


def _text_column(ds: datasets.Dataset, text_field: str, where: Path | str) -> datasets.Dataset:
    if text_field not in ds.column_names:
        raise DataError(f"{where}: no field {text_field!r} (fields: {ds.column_names}); pass --text-field NAME")
    ds = ds.select_columns([text_field])
    return ds.rename_column(text_field, "text") if text_field != "text" else ds


def _texts(ds: datasets.Dataset, batch_size: int = 10_000):
    for start in range(0, len(ds), batch_size):
        yield "".join(ds[start : start + batch_size]["text"])


def load_corpus(
    source: str,
    text_field: str = "text",
    sample_by: str = "paragraph",
    hub_config: str | None = None,
    hub_split: str = "train",
    streaming: bool = False,
    max_documents: int | None = None,
) -> Corpus:
    """`stdlib`, an existing local path, or else a hub dataset name. Empty documents are dropped."""
    if source == "stdlib":
        corpus = load_stdlib()
    elif Path(source).exists():
        corpus = load_local(Path(source), text_field, sample_by)
    elif HUB_NAME.fullmatch(source) and not _looks_like_a_file(source):
        try:
            corpus = load_hub(source, hub_config, hub_split, text_field, streaming, max_documents)
        except DataError:
            raise
        except Exception as error:  # offline, unknown name, gated...: one line, not a trace
            raise DataError(
                f"--source {source}: not a local path, and loading it from the Hugging Face hub "
                f"failed: {str(error).splitlines()[0] if str(error) else type(error).__name__}"
            ) from error
    else:
        raise DataError(f"--source {source}: no such file or folder (and not a hub dataset name)")
    corpus.documents = corpus.documents.filter(
        lambda batch: [bool(t and t.strip()) for t in batch["text"]], batched=True
    )
    if len(corpus.documents) == 0:
        raise DataError(f"--source {source}: the corpus has no non-empty documents")
    return corpus
