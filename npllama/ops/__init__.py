"""The ops: one file each, `forward(...) -> (y, cache)` beside `backward(dy, cache) -> (dx, *dparams)`,
the equations and shapes in each module's docstring. They compute on plain arrays of whatever module
holds them (NumPy or CuPy, backend.py); every product with a weight goes through linear.py's seam.

    linear          y = x Wᵀ, and the product seam (weights that multiply themselves, fused weights)
    embedding       row gather; scatter-add backward
    rmsnorm         RMSNorm
    rope            rotary position embedding as complex multiplication; the paired row order
    attention       causal attention of projected q, k, v with GQA
    swiglu          the SwiGLU feed-forward network
    cross_entropy   softmax, log-softmax and the cross-entropy loss (the only ones)
    lm_head         logits and the fused cross-entropy
    lora            the LoRA delta s·(x Aᵀ) Bᵀ
"""
