"""hearth.agents"""
