"""Networks: the frozen DINOv3 and CLIP text towers and the AD-DINOv3 head."""
