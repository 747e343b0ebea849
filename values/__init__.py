"""Value learning: encoders, critics, Cal-QL, IQL, value checkpoints."""
