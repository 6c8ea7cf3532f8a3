"""Opt-in engines that own the parameters and optimizer around sequence-parallel attention."""
