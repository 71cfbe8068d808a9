"""The commands: every `main()` of esrt-jax, in the top layer (a command may import any layer).

    esrt-train (train.py)        train            esrt-eval (eval.py)        eval
    esrt-infer                   infer            esrt-serve                 serve
    esrt-edge                    edge             esrt-export                export
    esrt-encode-cache            encode_cache     esrt-prepare-fleurs        prepare_fleurs

The `python -m esrt_jax.X` spellings still work: those modules run these by name (runpy).
"""
