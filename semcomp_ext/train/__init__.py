"""Training and end-to-end reproduction: open_clip encoders trained with the fused ClipLoss at
chosen temperatures (`semcomp train`), then the paper's measurements (`semcomp reproduce`).
Heavy dependencies (open_clip, matplotlib, faiss) are imported inside functions."""
