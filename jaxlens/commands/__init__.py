"""One module per `jaxlens` sub-command. Each defines `register(subparsers)`, which adds its parser
and sets `run=fn(args) -> exit code`. The CLI imports only the module of the command it runs, so
`jaxlens --help` stays fast (heavy imports live inside the run functions)."""

# Order here is the order in `jaxlens --help`. Add a command: a module here + its name below.
COMMANDS = ("lens", "tuned_lens", "latent_language", "mc_lens", "shared_space", "eval", "neurons", "steer", "transplant",
            "subspace", "convert", "families", "models", "plan", "bench")
