"""Jitted, sharded reductions that run inside the forward program (logit lens, neuron statistics)."""
