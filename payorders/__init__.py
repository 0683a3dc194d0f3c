"""payorders: pay orders that end in exactly one terminal state, and money that always goes back."""
