"""Finding plugin processes and sampling them; pure data out."""
