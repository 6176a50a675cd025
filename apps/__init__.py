"""Applications built on guidekit: the command line, the Gradio demo, batch generation, benchmarks."""
