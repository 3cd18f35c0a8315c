"""The fused_resnet benchmark suite (a package, so that its modules never clash with tests/ of the same name)."""
