"""The commands: every `main()` of esrt-jax, in the top layer (a command may import any layer).

    module            console command        also runs as
    train             esrt-train             python train.py, python -m esrt_jax.train.run
    eval              esrt-eval              python eval.py
    infer             esrt-infer             python -m esrt_jax.infer
    serve             esrt-serve             python -m esrt_jax.serve
    edge              esrt-edge              python -m esrt_jax.edge
    export            esrt-export            python -m esrt_jax.export
    encode_cache      esrt-encode-cache      python -m esrt_jax.data.encode_cache
    prepare_fleurs    esrt-prepare-fleurs    python -m esrt_jax.data.prepare_fleurs
    demo              esrt-demo-corpus       python -m esrt_jax.data.demo
    tfds_builder      esrt-tfds              python -m esrt_jax.data.tfds_builder
    curves            esrt-curves            python -m esrt_jax.train.curves

The `python -m` modules run these by name (runpy) rather than importing them, so the library
layers below never import upwards.
"""
