"""Steering: how a direction is applied (one router: hook, LoRA, control vector), exports, merge, SteeredModel."""
