"""hearth.quantize"""
