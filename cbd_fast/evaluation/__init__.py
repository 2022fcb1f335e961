"""Everything that needs labels: backdoor attacks, baselines, metrics, diagnostics, the
Fashion-MNIST data and models, and the demo. Only used to evaluate a defense, never to run one."""
