"""Training batches from a token cache (with teacher targets) or from plain examples (without).

Order. The loader walks an endless stream of rows: epoch e is a permutation of all rows drawn from
NumPy's generator seeded with (seed, e); batches take consecutive stream entries, crossing epoch
boundaries, so every batch is full. The distilled student and the baseline, given the same seed,
see the same sequences in the same order. `state_dict()` is the stream position after the last
batch handed out; `load_state_dict` resumes exactly there (prefetched batches are discarded).

Packing. By default each row holds one sequence, right-padded (or truncated) to seq_len: no
attention crosses documents. With `pack=True` whole sequences are concatenated greedily into rows;
mlx-lm models only apply a causal mask, so a packed document attends to the documents before it
in its row (a leak of context, not of labels: the position that would predict the next document's
first token is masked out). Use it only for pretraining-style text.

Prefetch. A background thread builds the next `prefetch` batches as NumPy arrays; the consumer
turns them into `mx.array`s, so MLX is only used on the caller's thread.
"""

from __future__ import annotations

import queue
import threading
import weakref
from collections.abc import Sequence
from typing import NamedTuple

import mlx.core as mx
import numpy as np

from mlx_distill.cache.reader import TokenCache
from mlx_distill.errors import BadInput
from mlx_distill.kernels.targets import SparseTargets
from mlx_distill.text.examples import TokenizedExample


class Batch(NamedTuple):
    """One training batch of B rows of length L.

    tokens (B, L) int32 inputs; labels (B, L) int32 with labels[:, t] the token after
    tokens[:, t]; mask (B, L) bool, True where labels[:, t] is trained on (False on padding);
    targets: SparseTargets with ids (B, L, K) int32 and logprobs (B, L, K) float32 at the same
    positions (empty slots -inf; positions without teacher targets hold the label with log-prob
    0 in slot 0, so every position is a valid distribution), or None without a cache.
    """

    tokens: mx.array
    labels: mx.array
    mask: mx.array
    targets: SparseTargets | None


class Loader:
    """Endless, deterministic, resumable batches. Iterate and take as many as you need.

    source: an opened TokenCache (batches carry targets) or a list of TokenizedExample (targets
    None). seq_len L: rows are padded/truncated to L input tokens (L + 1 tokens incl. labels).
    rank, world: in a distributed run, batches hold this rank's batch_size / world rows of the
    global batch (the same global batches for any world size).
    """

    def __init__(
        self,
        source: TokenCache | Sequence[TokenizedExample],
        *,
        batch_size: int,
        seq_len: int,
        seed: int = 0,
        shuffle: bool = True,
        prefetch: int = 2,
        pack: bool = False,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        if batch_size <= 0 or seq_len <= 0:
            raise BadInput("loader batch_size and seq_len must be > 0")
        if batch_size % world:
            raise BadInput(f"batch size {batch_size} does not divide by the {world} ranks")
        # Distributed: every rank walks the same global batches and keeps rows
        # [rank * B / W, (rank + 1) * B / W) of each; the position is the global one.
        self.rank, self.world, self.local_rows = rank, world, batch_size // world
        self.source = source
        self.has_targets = isinstance(source, TokenCache)
        self.rows = len(source)
        if self.rows == 0:
            raise BadInput("loader: no training sequences")
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.shuffle, self.prefetch, self.pack = shuffle, max(1, prefetch), pack
        self.k_slots = source.k_slots if self.has_targets else 0
        self._position = 0  # stream index of the next row to hand out
        self._batches = 0
        self._perm_epoch = -1
        self._perm = np.arange(self.rows)
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()

    # -- order ------------------------------------------------------------------------------

    def _row_at(self, stream_index: int) -> int:
        epoch, offset = divmod(stream_index, self.rows)
        if epoch != self._perm_epoch:
            if self.shuffle:
                self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.rows)
            self._perm_epoch = epoch
        return int(self._perm[offset])

    def _read(self, row: int):
        """(tokens, mask, positions, counts, ids, logprobs) of one row, targets None w/o cache."""
        if self.has_targets:
            return self.source.row(row)
        ex = self.source[row]
        return ex.tokens, ex.mask, None, None, None, None

    # -- batch assembly (background thread) --------------------------------------------------

    def _make(self, position: int) -> tuple[dict[str, np.ndarray], int]:
        """Build the batch starting at stream `position`; return it and the next position."""
        B, L, K = self.local_rows, self.seq_len, self.k_slots
        first = self.rank * B  # this rank's first row of the global batch
        tokens = np.zeros((B, L), dtype=np.int32)
        labels = np.zeros((B, L), dtype=np.int32)
        mask = np.zeros((B, L), dtype=bool)
        ids = np.zeros((B, L, K), dtype=np.int32) if self.has_targets else None
        lps = np.full((B, L, K), -np.inf, dtype=np.float32) if self.has_targets else None
        for g in range(self.batch_size):
            b = g - first  # row in this rank's arrays; other ranks' rows only advance position
            mine = 0 <= b < B
            offset = 0
            while offset < L:
                if self.pack and offset > 0:
                    # only whole next documents join a packed row
                    length = self._length_at(position)
                    if offset + length > L:
                        break
                if mine:
                    row = self._read(self._row_at(position))
                    self._place(row, b, offset, tokens, labels, mask, ids, lps)
                    length = len(row[0])
                else:
                    length = self._length_at(position) if self.pack else 0
                position += 1
                offset += max(1, length)
                if not self.pack:
                    break
            if self.pack and mine:
                # across a document boundary the label is the next document's first token (masked)
                end = min(offset, L)
                labels[b, : end - 1] = tokens[b, 1:end]
        if self.has_targets:
            # slot 0 of untargeted positions: the label with probability 1 (a valid distribution)
            plain = lps[:, :, 0] == -np.inf
            ids[:, :, 0] = np.where(plain, labels, ids[:, :, 0])
            lps[:, :, 0] = np.where(plain, 0.0, lps[:, :, 0])
        arrays = {"tokens": tokens, "labels": labels, "mask": mask, "ids": ids, "logprobs": lps}
        return arrays, position

    def _length_at(self, position: int) -> int:
        row = self._row_at(position)
        if self.has_targets:
            return self.source.row_length(row)
        return len(self.source[row].tokens)

    def _place(self, row, b, offset, tokens, labels, mask, ids, lps) -> None:
        """Copy one sequence into batch row b from column `offset`, truncating at L."""
        seq, seq_mask, positions, counts, row_ids, row_lps = row
        L = self.seq_len
        n_in = max(0, min(len(seq), L - offset))
        n_lab = max(0, min(len(seq) - 1, L - offset))
        tokens[b, offset : offset + n_in] = seq[:n_in]
        labels[b, offset : offset + n_lab] = seq[1 : n_lab + 1]
        mask[b, offset : offset + n_lab] = seq_mask[1 : n_lab + 1]
        if positions is None or len(positions) == 0:
            return
        starts = np.cumsum(counts) - counts
        pos = np.repeat(positions, counts)
        slot = np.arange(len(row_ids)) - np.repeat(starts, counts)
        keep = pos < n_lab
        ids[b, offset + pos[keep], slot[keep]] = row_ids[keep]
        lps[b, offset + pos[keep], slot[keep]] = row_lps[keep]

    @staticmethod
    def _worker(ref: weakref.ref, position: int, out: queue.Queue, stop: threading.Event) -> None:
        # A weak reference: an abandoned Loader can be collected, and its __del__ stops us.
        try:
            while not stop.is_set():
                loader = ref()
                if loader is None:
                    return
                item = loader._make(position)
                del loader
                position = item[1]
                while not stop.is_set():
                    try:
                        out.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # hand the error (e.g. a corrupted shard) to the consumer
            out.put(e)

    # -- public iteration and state ----------------------------------------------------------

    def __iter__(self) -> Loader:
        return self

    def __next__(self) -> Batch:
        if self._thread is None:
            self._stop = threading.Event()
            self._queue = queue.Queue(maxsize=self.prefetch)
            self._thread = threading.Thread(
                target=Loader._worker,
                args=(weakref.ref(self), self._position, self._queue, self._stop),
                daemon=True,
            )
            self._thread.start()
        item = self._queue.get()
        if isinstance(item, BaseException):
            self.close()
            raise item
        arrays, self._position = item
        self._batches += 1
        targets = None
        if self.has_targets:
            targets = SparseTargets(mx.array(arrays["ids"]), mx.array(arrays["logprobs"]))
        return Batch(
            mx.array(arrays["tokens"]),
            mx.array(arrays["labels"]),
            mx.array(arrays["mask"]),
            targets,
        )

    def close(self) -> None:
        """Stop the prefetch thread (batches it built are dropped; the position is kept)."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self._queue = None

    def state_dict(self) -> dict:
        """JSON-able position: restoring it makes the next batch the one that would follow."""
        return {
            "position": self._position,
            "batches": self._batches,
            "seed": self.seed,
            "rows": self.rows,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "shuffle": self.shuffle,
            "pack": self.pack,
        }

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "rows", "batch_size", "seq_len", "shuffle", "pack"):
            if state.get(key) != getattr(self, key):
                raise BadInput(
                    f"loader state does not match this loader: {key} is {state.get(key)!r} in the "
                    f"checkpoint, {getattr(self, key)!r} now"
                )
        self.close()
        self._position = int(state["position"])
        self._batches = int(state["batches"])

    def __del__(self) -> None:
        if getattr(self, "_thread", None) is not None:
            self._stop.set()
