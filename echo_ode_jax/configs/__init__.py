"""get_config() files for the experiment scripts' `--config` flag (ml_collections)."""
