"""Building blocks of `examples/demo_bbc_minilm.py`: data, one setup function per method, training, report."""
