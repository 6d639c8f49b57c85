"""Generators: write a LoRA adapter for a new task from its description (SG-LoRA) or a few examples (ICM-LoRA).

    layout.py    ParamLayout: an adapter <-> one (P,) vector, with a clear error for another layout
    space.py     ParamSpace: per-tensor normalisation and the basis spanned by the training vectors
    cvae.py      the conditional VAE both methods share, and its (tqdm) fitting loop
    base.py      the generator abstraction, the GENERATORS catalog, similarity profiles, refusals
    sg_lora.py   SG-LoRA (arXiv 2509.10535): description -> prior from the top-k similar experts
    icm_lora.py  ICM-LoRA (arXiv 2501.17635): a few examples -> in-context task vector -> CVAE
    workflow.py  the registry side: training sets, storing / loading generators, registering adapters
"""
