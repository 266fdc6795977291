"""The console commands, one module each: compose the config (Hydra, `l2a_common.hydra_app`),
call the library. Nothing here is imported by the library.

    l2a-train     l2a_train.cli.train     (also `torchrun -m l2a_train.cli.train`)
    l2a-convert   l2a_train.cli.convert
    l2a-eval      l2a_train.cli.eval
    l2a-prune     l2a_train.cli.prune
    l2a-generate  l2a_train.cli.generate
    l2a-plot      l2a_train.cli.plot      (argparse: it takes run directories)

`l2a-prep` is `l2a_data_prep.cli` (data prep must not import the trainer).
"""
