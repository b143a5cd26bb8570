"""hearth.training"""
