"""One module per `moe-sft` verb (see `moe_sft.cli.VERBS`)."""
