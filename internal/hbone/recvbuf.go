package hbone

import "sync"

// recvBuf holds received bytes in pooled chunks, so an idle stream holds no
// buffer and a busy one holds only what the peer sent ahead of the reader.
type recvBuf struct {
	chunks []*[]byte // pooled chunks; (*chunks[0])[off:] is unread
	off    int
	n      int
}

const chunkSize = 32 << 10

var chunkPool = sync.Pool{New: func() any { b := make([]byte, 0, chunkSize); return &b }}

func (b *recvBuf) len() int { return b.n }

func (b *recvBuf) write(p []byte) {
	b.n += len(p)
	for len(p) > 0 {
		if k := len(b.chunks); k > 0 {
			last := b.chunks[k-1]
			if free := cap(*last) - len(*last); free > 0 {
				m := min(free, len(p))
				*last = append(*last, p[:m]...)
				p = p[m:]
				continue
			}
		}
		c := chunkPool.Get().(*[]byte)
		*c = (*c)[:0]
		b.chunks = append(b.chunks, c)
	}
}

func (b *recvBuf) read(p []byte) int {
	total := 0
	for len(p) > 0 && len(b.chunks) > 0 {
		first := b.chunks[0]
		m := copy(p, (*first)[b.off:])
		p = p[m:]
		b.off += m
		total += m
		if b.off == len(*first) {
			chunkPool.Put(first)
			// Shift rather than reslice, so the slice's array is reused
			// instead of creeping forward and reallocating.
			k := copy(b.chunks, b.chunks[1:])
			b.chunks[k] = nil
			b.chunks = b.chunks[:k]
			b.off = 0
		}
	}
	b.n -= total
	return total
}

// take removes the first chunk and returns it with the offset of its
// unread bytes; the caller owns it (and puts it back in chunkPool).
func (b *recvBuf) take() (*[]byte, int) {
	c, off := b.chunks[0], b.off
	k := copy(b.chunks, b.chunks[1:])
	b.chunks[k] = nil
	b.chunks = b.chunks[:k]
	b.off = 0
	b.n -= len(*c) - off
	return c, off
}

func (b *recvBuf) reset() {
	for _, c := range b.chunks {
		chunkPool.Put(c)
	}
	*b = recvBuf{}
}
