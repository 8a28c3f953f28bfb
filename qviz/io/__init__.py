"""Reading and writing qviz session files."""
