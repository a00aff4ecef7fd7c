"""The parts of the ``offload`` expert backend (services/engine/model/expert_backends/offload.py).

Glossary
- slower tier: where every expert's weights live: the checkpoint's safetensors file, read
  with positional reads into owned memory (a CPU host), or CPU memory (a GPU host).
- slot: room for one expert's weights (gate_up [2I, D] and down [D, I]) in the fast tier,
  the device the model runs on. A layer has ``num_slots`` of them, fixed at build time.
- hot-expert cache: which expert sits in which slot of one layer (``cache.ExpertCache``),
  and which one leaves when another must come in (``policies.EvictionPolicy``).
- use: one expert needed by one layer in one step (however many tokens it got); a hit when
  it is resident at that moment, a miss otherwise. The routing trace is the sequence of uses.
- prefetch: loading the experts the next MoE layer's router predicts from this layer's input
  while this layer computes (Eliseev & Mazur 2023, "Fast Inference of Mixture-of-Experts
  Language Models with Offloading", section 3.2).
- oracle hit rate: the hit rate of Belady's MIN on the same trace with the same slots
  (``oracle.belady_hits``): the best any eviction policy could do without prefetch.
"""
