"""hearth.clients"""
