"""directions"""
