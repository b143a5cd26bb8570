"""hearth.serve"""
