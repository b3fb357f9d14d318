"""One module per fused-MoE kernel, each with the same small interface (see ops/dispatch.py):
NAME, H_MULTIPLE, I_MULTIPLE, unavailable_reason(device), prepared_shapes(...), prepare(...),
moe(...)."""
