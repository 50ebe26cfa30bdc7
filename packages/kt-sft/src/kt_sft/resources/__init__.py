"""Package data of kt-sft: the bundled demo dataset, its generator, the demo configuration."""
