"""The engine: sequences, the batched token step, the scheduler and the text layer."""
