"""Tests in headless chromium through Playwright (marked ``browser``); helpers.py holds what they share."""
