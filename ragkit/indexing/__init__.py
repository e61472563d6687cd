"""Dense retrieval over passage indexes, and hybrid retrieval that fuses runs."""
