"""A latent cache written the plainest way behind runtime/session.py's LatentCache: numpy arrays that grow by
concatenation, rebuilt whole by every slot operation; no preallocation, no views, nothing shared with
runtime/kv_cache.py. The cache tests hold the real caches to it, and the scheduler runs over it."""

import numpy as np

from moetrt import MoetrtError


class ReferenceLatentCache:
    def __init__(self, num_layers, latent_dim, slots, max_context, dtype=np.float32):
        self.num_layers, self.latent_dim, self.dtype = num_layers, latent_dim, np.dtype(dtype)
        self.slots, self.max_context = slots, max_context
        self._start_over()

    def _start_over(self):
        self.length = 0
        self.rows = [np.zeros((0, self.slots, self.latent_dim), self.dtype) for _ in range(self.num_layers)]
        self.mask = np.zeros((self.slots, 0), np.int64)
        self.new_rows, self.new_mask = None, None

    def _append(self, rows, mask):
        self.rows = [np.concatenate([old, new]) for old, new in zip(self.rows, rows)]
        self.mask = np.concatenate([self.mask, mask], axis=1)
        self.length += mask.shape[1]

    def past(self):
        return self.rows

    def reserve(self, steps):
        if self.length + steps > self.max_context:
            raise MoetrtError(f"sequence of {self.length + steps} tokens exceeds the engine's context")
        self.new_rows = [np.zeros((steps, self.slots, self.latent_dim), self.dtype) for _ in range(self.num_layers)]
        return self.new_rows

    def attention_mask(self, steps, valid):
        self.new_mask = np.array(valid, np.int64).reshape(self.slots, steps)
        return np.concatenate([self.mask, self.new_mask], axis=1)

    def advance(self, steps):
        self._append(self.new_rows, self.new_mask)

    def resize(self, slots):
        keep = min(slots, self.slots)
        pad = ((0, 0), (0, slots - keep), (0, 0))
        self.rows = [np.pad(rows[:, :keep], pad) for rows in self.rows]
        self.mask = np.pad(self.mask[:keep], ((0, slots - keep), (0, 0)))
        self.slots = slots

    def extend_to(self, length):
        if length > self.length:
            if length > self.max_context:
                raise MoetrtError(f"sequence of {length} tokens exceeds the engine's context")
            steps = length - self.length
            self._append([np.zeros((steps, self.slots, self.latent_dim), self.dtype)] * self.num_layers,
                         np.zeros((self.slots, steps), np.int64))

    def place(self, slot, prefilled):
        count = prefilled.length
        self.extend_to(count)
        start = self.length - count
        for rows, source in zip(self.rows, prefilled.rows):
            rows[:, slot] = np.concatenate([np.zeros((start, self.latent_dim), self.dtype), source[:, 0]])
        self.mask[slot] = np.concatenate([np.zeros(start, np.int64), np.ones(count, np.int64)])

    def free(self, slot):
        self.mask[slot] = 0

    def reset(self):
        self._start_over()

    def compact(self, slots):
        kept = {slot: self.mask[slot] == 1 for slot in slots}
        length = max((int(columns.sum()) for columns in kept.values()), default=0)
        rows = [np.zeros((length, self.slots, self.latent_dim), self.dtype) for _ in range(self.num_layers)]
        mask = np.zeros((self.slots, length), np.int64)
        for slot, columns in kept.items():
            count = int(columns.sum())
            for new, old in zip(rows, self.rows):
                new[length - count :, slot] = old[columns, slot]
            mask[slot, length - count :] = 1
        self.rows, self.mask, self.length = rows, mask, length


class ReferenceCacheSession:
    """A session whose caches are ReferenceLatentCache: the wrapped host session runs the graph."""

    def __init__(self, session):
        self.session = session
        self.backend, self.num_layers = "reference", session.num_layers
        self.latent_dim, self.vocab_size = session.latent_dim, session.vocab_size

    def new_cache(self, slots, max_context):
        return ReferenceLatentCache(self.num_layers, self.latent_dim, slots, max_context, self.session.dtype)

    def run(self, input_ids, position_ids, attention_mask, logit_positions, past, new_rows=None):
        return self.session.run(input_ids, position_ids, attention_mask, logit_positions, past, new_rows)
