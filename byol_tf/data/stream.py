"""`StreamPosition`: where a training or evaluation stream is, and what it skipped on the way."""

import numpy as np
import tensorflow as tf


class StreamPosition:
    """Which record the stream has reached after each batch, and what it skipped on the way.

    Filled by `pretrain_dataset` as batches are made (ahead of training, in
    order); `after(step)` is where a run that has trained `step` steps
    resumes. Records missing between batches failed to decode: each is named
    by the source and added to its `SkipLog`.
    """

    def __init__(self, source, train=True):
        self.source, self.train = source, train
        self.restart(0, 0)

    def restart(self, start_step, start_position):
        """A new stream starts: batch `start_step` begins at `start_position`."""
        self._start = self._next = int(start_position)
        self.ends = {s: p for s, p in getattr(self, "ends", {}).items() if s < start_step - 1}
        self.ends[int(start_step) - 1] = int(start_position)

    def observe(self, step, positions):
        step, positions = int(step), np.asarray(positions)
        if not len(positions):
            return
        # The same dataset iterated again starts over.
        expected = self._next if positions[0] >= self._next else self._start
        missing = sorted(set(range(expected, int(positions[-1]) + 1)) - set(positions.tolist()))
        for position in missing:
            self.source.skips.add(*self.source.describe(position, self.train))
        self._next = self.ends[step] = int(positions[-1]) + 1
        for old in [s for s in self.ends if s < step - 1000]:
            del self.ends[old]

    def after(self, steps):
        """The stream position after `steps` optimizer steps (batches `0 .. steps - 1`)."""
        return self.ends[int(steps) - 1]

    def observe_op(self, step, positions):
        """`observe` as an op in the `tf.data` graph; returns `step`."""

        def observe(s, p):
            self.observe(s.numpy(), p.numpy())
            return s

        return tf.py_function(observe, [step, positions], tf.int64)
