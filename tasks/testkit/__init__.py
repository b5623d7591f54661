"""What tests and the demo use: the sample world, the model smoke run, the chaos harness."""
