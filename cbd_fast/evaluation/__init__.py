"""Everything that needs labels: backdoor attacks, baselines, metrics, diagnostics, the
Fashion-MNIST data and models, and the shipped backdoored models. Used only to evaluate a defense,
never to run one; the label-free core never imports this package."""
