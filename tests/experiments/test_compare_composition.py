"""compare composes every technique: the memory notes beside the measured bytes."""

import types

from experiments import compare

CFG = types.SimpleNamespace(num_layers=2, head_dim=16)


def test_memory_notes_name_presses_above_their_promise():
  ts = compare.parse_techniques(["snapkv", "adakv", "think", "int4"], [0.5])
  notes = compare.memory_notes(ts, CFG, 1024)
  # AdaKV pads heads to 1.5 x 512 = 768 of 1024 slots; ThinK keeps half the key channels
  # and every value: (8 + 16) / 32 of the K + V bytes; SnapKV keeps its 512
  assert notes == ["  adakv@0.5: keeps 0.75 of the dense bytes at 1024 tokens (the ratio "
                   "alone: 0.5)",
                   "  think@0.5: keeps 0.75 of the dense bytes at 1024 tokens (the ratio "
                   "alone: 0.5)"]
