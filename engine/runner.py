"""`ModelRunner`: executes one `SchedulerOutput` as one `Transformer.forward_batch`."""

from __future__ import annotations

import numpy as np

from llmx.engine.kv_cache import KVCache, SequenceHandle
from llmx.engine.scheduler import SchedulerOutput
from llmx.engine.transformer import Transformer


class ModelRunner:
    def __init__(self, transformer: Transformer, cache: KVCache):
        self.transformer = transformer
        self.cache = cache

    def run(self, output: SchedulerOutput) -> dict[int, np.ndarray]:
        """seq_id -> float32 logits [n_draft + 1, n_vocab] of the chunk's last rows (its last known
        token's and its proposals'), for the chunks that want them."""
        if not output.chunks:
            return {}
        # The scheduler gave every chunk its blocks: the handles only say where to write.
        batch = [(SequenceHandle(list(c.block_table), c.start, c.n_prompt), np.array(c.tokens, np.int64))
                 for c in output.chunks]
        wanted = [c.n_logit_rows for c in output.chunks]
        logits = self.transformer.forward_batch(batch, self.cache, wanted)
        return {c.seq_id: rows for c, rows in zip(output.chunks, logits, strict=True) if c.wants_logits}
