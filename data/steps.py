"""The steps of a datatrove preparation pipeline that are ours (datatrove provides the readers, filters and
dedup stages around them).

- `Words`: English words and sentences by regular expression, for datatrove's filters and MinHash (its own
  English splitter needs spaCy, a 200 MB dependency, for what a regex does well enough on English text).
- `Counted`: wraps a datatrove step that only drops documents, and tallies what it removed (documents, and
  tokens: the dropped documents are encoded, the kept ones only once, at the end).
- `WriteTokens`: the last step; encodes each kept document (EOS after it) into its rank's token file.
- `EarliestCopyCluster`: MinHash's clustering stage, keeping the earliest copy in corpus order (datatrove's
  keeps a cluster's union-find root, which depends on the number of tasks).
- `text_of` and `earlier_chunk_first`: exact dedup's content and priority, so that it keeps the earliest copy.

A rank reads one staged chunk, a contiguous run of the corpus; so a document's (rank, index in the rank's
stream) orders like its place in the corpus, and "earliest" is the same whatever the number of tasks.
"""

import json
import re
import struct
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from datatrove.data import Document, DocumentsPipeline
from datatrove.io import DataFolderLike, get_datafolder
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.dedup.minhash import MinhashConfig
from datatrove.utils.binaryio import read_tuples_from_file
from datatrove.utils.word_tokenizers import WordTokenizer

from . import tokenizer as tok

PRIORITY_TOP = 65535  # exact dedup keeps the highest priority; datatrove stores it in 16 bits
ENCODE_BATCH = 64  # pieces per tokenizer call: at most 64 * tok.PIECE_CHARS characters held encoded
WORD = re.compile(r"\w+(?:['’]\w+)*|[^\w\s]+")
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def encode(texts: list[str], tokenizer: tok.Tokenizer) -> list[list[int]]:
    """Token ids of each text, EOS after it. Texts are cut into pieces the tokenizer holds cheaply (the cut
    changes no token), and pieces of several texts go to the tokenizer together: a call costs more than a
    short paragraph's tokens."""
    owners, pieces = [], []
    for owner, text in enumerate(texts):
        for piece in tok.pieces(text):
            owners.append(owner)
            pieces.append(piece)
    out: list[list[int]] = [[] for _ in texts]
    for start in range(0, len(pieces), ENCODE_BATCH):
        batch = tokenizer.encode_batch_fast(pieces[start : start + ENCODE_BATCH], add_special_tokens=False)
        for owner, encoding in zip(owners[start : start + ENCODE_BATCH], batch):
            out[owner].extend(encoding.ids)
    for ids in out:
        ids.append(tok.EOS_ID)  # the separator of the packed stream
    return out


class Words(WordTokenizer):
    def __init__(self):
        super().__init__("eng")

    def word_tokenize(self, text: str) -> list[str]:
        return WORD.findall(text)

    def sent_tokenize(self, text: str) -> list[str]:
        return [s for s in SENTENCE_END.split(text) if s.strip()]

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        spans, start = [], 0
        for match in SENTENCE_END.finditer(text):
            spans.append((start, match.start()))
            start = match.end()
        return spans + [(start, len(text))] if start < len(text) else spans


def _write_tally(folder: DataFolderLike, name: str, rank: int, tally: dict) -> None:
    with get_datafolder(folder).open(f"{name}/{rank:05d}.json", "w") as f:
        json.dump(tally, f)


def _add(tally: dict, doc: Document, tokens: int) -> None:
    documents, total = tally.get(doc.metadata["split"], (0, 0))
    tally[doc.metadata["split"]] = (documents + 1, total + tokens)


class Counted(PipelineStep):
    """`step` run on the stream, with what it dropped tallied per split into tally/NAME/RANK.json."""

    type = "📊 - COUNT"

    def __init__(self, step: PipelineStep, label: str, tally_folder: DataFolderLike, tokenizer_path: str):
        super().__init__()
        self.step, self.label, self.tally_folder, self.tokenizer_path = step, label, tally_folder, tokenizer_path
        self.name = f"{label} (counted)"

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        tokenizer = tok.Tokenizer.from_file(self.tokenizer_path)  # this run's: never one cached from another
        pending: deque[Document] = deque()
        dropped: list[Document] = []
        removed: dict = {}

        def fed() -> Iterator[Document]:
            for doc in data:
                pending.append(doc)
                yield doc

        def tally() -> None:
            for doc, ids in zip(dropped, encode([doc.text for doc in dropped], tokenizer)):
                _add(removed, doc, len(ids))
            dropped.clear()

        for kept in self.step.run(fed(), rank, world_size):
            while pending and pending[0] is not kept:  # the step keeps order and only drops: these went
                dropped.append(pending.popleft())
            assert pending, f"{self.label}: yielded a document it was not given; only drop-only steps are counted"
            yield pending.popleft()
            if len(dropped) >= ENCODE_BATCH:
                tally()
        dropped.extend(pending)
        tally()
        self.stats = self.step.stats  # the wrapped step's own counts, in datatrove's stats.json
        _write_tally(self.tally_folder, self.label, rank, removed)


class WriteTokens(PipelineStep):
    """Each document's tokens, EOS after it, appended to tokens/RANK.SPLIT.bin; the count in tally/kept."""

    type = "🔢 - TOKENIZER"
    name = "write tokens"

    def __init__(self, output_folder: str, tokenizer_path: str, dtype: str, tally_folder: DataFolderLike):
        super().__init__()
        self.output_folder, self.tokenizer_path, self.dtype = output_folder, tokenizer_path, dtype
        self.tally_folder = tally_folder

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        tokenizer = tok.Tokenizer.from_file(self.tokenizer_path)  # this run's: never one cached from another
        folder = Path(self.output_folder)
        folder.mkdir(parents=True, exist_ok=True)
        kept: dict = {}
        files = {split: open(folder / f"{rank:05d}.{split}.bin", "wb") for split in ("train", "val")}
        try:
            batch: list[Document] = []
            for doc in data:
                batch.append(doc)
                if len(batch) == ENCODE_BATCH:
                    self._write(batch, tokenizer, files, kept)
                    batch = []
            self._write(batch, tokenizer, files, kept)
        finally:
            for file in files.values():
                file.close()
        _write_tally(self.tally_folder, "kept", rank, kept)
        return iter(())

    def _write(self, batch: list[Document], tokenizer: tok.Tokenizer, files: dict, kept: dict) -> None:
        """One write per split for the whole batch: a short paragraph's tokens cost less than a write."""
        by_split: dict[str, list[int]] = {}
        for doc, ids in zip(batch, encode([doc.text for doc in batch], tokenizer)):
            by_split.setdefault(doc.metadata["split"], []).extend(ids)
            _add(kept, doc, len(ids))
        for split, ids in by_split.items():
            files[split].write(np.array(ids, dtype=self.dtype).tobytes())
            self.stat_update("tokens", value=len(ids))


def text_of(doc: Document) -> str:
    return doc.text


def earlier_chunk_first(doc: Document) -> int:
    """Exact dedup keeps the highest priority and, among equal ones, the smallest index in its rank's stream
    (datatrove 0.10's HashSig order: hash, -priority, doc index; hence the <0.11 pin). A rank reads one staged
    chunk, so chunk, then index, is corpus order."""
    return PRIORITY_TOP - doc.metadata["chunk"]


class EarliestCopyCluster(PipelineStep):
    """MinHash stage 3 (one task): the documents linked by a shared bucket signature form clusters; each
    cluster keeps its earliest document, every other one is listed in RANK.remove for MinhashDedupFilter."""

    type = "🫂 - DEDUP"
    name = "MinHash clusters, earliest kept"

    def __init__(self, input_folder: DataFolderLike, output_folder: DataFolderLike, config: MinhashConfig):
        super().__init__()
        self.input_folder, self.output_folder = get_datafolder(input_folder), get_datafolder(output_folder)
        self.config = config

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> None:
        assert world_size == 1, "the clusters span every rank's documents: one task"
        parent: dict[tuple[int, int], tuple[int, int]] = {}

        def root(node: tuple[int, int]) -> tuple[int, int]:
            while parent.get(node, node) != node:
                parent[node] = parent.get(parent[node], parent[node])  # path halving
                node = parent[node]
            return node

        for name in self.input_folder.list_files(glob_pattern="*.dups"):
            with self.input_folder.open(name, "rb") as f:
                for file_a, doc_a, file_b, doc_b in read_tuples_from_file(f, "4I"):
                    a, b = root((file_a, doc_a)), root((file_b, doc_b))
                    if a != b:  # the smaller node becomes the root: a root is its cluster's earliest document
                        parent[max(a, b)] = min(a, b)
        removals: dict[int, list[int]] = {}
        for node in sorted(parent):
            if root(node) != node:
                removals.setdefault(node[0], []).append(node[1])
                self.stat_update("to_remove")
        for file, docs in removals.items():
            with self.output_folder.open(f"{file:06d}.remove", "wb") as f:
                f.write(b"".join(struct.pack("<I", doc) for doc in docs))
