"""KV-cache blocks: allocate, free, reuse, and refuse cleanly when none are left.

The cache has ``num_blocks`` blocks of ``block_size`` token slots. The last block is the
scratch block: it is never handed to a sequence; the padding rows of a decode batch
and the padding tokens of a prefill batch read and write it (slot -1, vLLM's
PAD_SLOT_ID, is the last slot of the cache, i.e. inside the scratch block, when eager
PyTorch writes it), so padding never touches a sequence's cache.
"""

from __future__ import annotations


class OutOfBlocks(RuntimeError):
    """Not enough free KV-cache blocks; the message names the numbers."""

    def __init__(self, message: str, needed: int, free: int):
        super().__init__(message)
        self.needed, self.free = needed, free


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 2:
            raise ValueError(f"num_blocks must be >= 2 (one is the reserved scratch block), got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.scratch_block = num_blocks - 1
        # A stack: the block freed last is handed out first (hot blocks are reused).
        self._free: list[int] = list(range(num_blocks - 2, -1, -1))
        self.tables: dict[str, list[int]] = {}

    @property
    def num_usable(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def needed(self, seq_id: str, num_tokens: int) -> int:
        """How many more blocks `seq_id` needs to hold `num_tokens` tokens."""
        return max(0, self.blocks_for(num_tokens) - len(self.tables.get(seq_id, ())))

    def can_allocate(self, seq_id: str, num_tokens: int) -> bool:
        return self.needed(seq_id, num_tokens) <= self.num_free

    def allocate(self, seq_id: str, num_tokens: int) -> list[int]:
        """Grow `seq_id`'s block table to hold `num_tokens` tokens; returns the table.

        Raises OutOfBlocks (nothing allocated) when too few blocks are free."""
        need = self.needed(seq_id, num_tokens)
        if need > self.num_free:
            used = self.num_usable - self.num_free
            raise OutOfBlocks(
                f"out of KV-cache blocks: sequence {seq_id!r} needs {need} more block(s) of {self.block_size} "
                f"tokens to hold {num_tokens} tokens, but only {self.num_free} of {self.num_usable} usable blocks "
                f"are free ({used} held by {len(self.tables)} sequence(s); block {self.scratch_block} is the "
                f"reserved scratch block)", need, self.num_free)
        table = self.tables.setdefault(seq_id, [])
        for _ in range(need):
            table.append(self._free.pop())
        return table

    def free(self, seq_id: str) -> int:
        """Return `seq_id`'s blocks to the free list; returns how many were freed."""
        table = self.tables.pop(seq_id, [])
        self._free.extend(reversed(table))
        return len(table)

    def slot(self, seq_id: str, position: int) -> int:
        table = self.tables[seq_id]
        return table[position // self.block_size] * self.block_size + position % self.block_size
