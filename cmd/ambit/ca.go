package main

import (
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/ambitmesh/ambit/internal/identity"
	"github.com/spf13/cobra"
)

func newCACmd() *cobra.Command {
	ca := &cobra.Command{
		Use:   "ca",
		Short: "Create a mesh CA and issue workload certificates (Istio plug-in CA layout)",
	}
	ca.AddCommand(newCAInitCmd(), newCAIssueCmd())
	return ca
}

func newCAInitCmd() *cobra.Command {
	var dir, org string
	var validity time.Duration
	cmd := &cobra.Command{
		Use:   "init --dir DIR",
		Short: "Create a self-signed root CA in DIR (ca-cert.pem, ca-key.pem, root-cert.pem, cert-chain.pem)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if dir == "" {
				return fmt.Errorf("--dir is required")
			}
			if validity <= 0 {
				return fmt.Errorf("--validity %v: must be positive", validity)
			}
			ca, err := identity.InitCA(dir, org, validity)
			if err != nil {
				return err
			}
			c := ca.Certificate()
			fmt.Fprintf(cmd.OutOrStdout(), "created CA %q in %s, valid until %s\n", c.Subject, dir, c.NotAfter.Format(time.RFC3339))
			return nil
		},
	}
	cmd.Flags().StringVar(&dir, "dir", "", "directory to write the CA into (required)")
	cmd.Flags().StringVar(&org, "org", "ambit", "organization name in the root's subject")
	cmd.Flags().DurationVar(&validity, "validity", 10*365*24*time.Hour, "how long the root is valid")
	return cmd
}

func newCAIssueCmd() *cobra.Command {
	var dir, idStr, out string
	var ttl time.Duration
	cmd := &cobra.Command{
		Use:   "issue --dir DIR --id spiffe://TD/ns/NS/sa/SA --out OUT",
		Short: "Issue a workload certificate: OUT/cert-chain.pem (leaf first), OUT/key.pem, OUT/root-cert.pem",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if dir == "" || idStr == "" || out == "" {
				return fmt.Errorf("--dir, --id and --out are required")
			}
			id, err := identity.Parse(idStr)
			if err != nil {
				return fmt.Errorf("--id: %w", err)
			}
			ca, err := identity.LoadCA(dir)
			if err != nil {
				return err
			}
			cert, err := (&identity.LocalIssuer{CA: ca, TTL: ttl}).Issue(cmd.Context(), id)
			if err != nil {
				return err
			}
			key, err := identity.EncodePrivateKey(cert.Key)
			if err != nil {
				return err
			}
			if err := os.MkdirAll(out, 0o755); err != nil {
				return err
			}
			files := []struct {
				name string
				data []byte
				mode os.FileMode
			}{
				{"cert-chain.pem", identity.EncodeCertificates(cert.Chain), 0o644},
				{"key.pem", key, 0o600},
				{"root-cert.pem", identity.EncodeCertificates(cert.Roots), 0o644},
			}
			for _, f := range files {
				if err := os.WriteFile(filepath.Join(out, f.name), f.data, f.mode); err != nil {
					return err
				}
			}
			fmt.Fprintf(cmd.OutOrStdout(), "issued %s, valid until %s, into %s\n", id, cert.NotAfter().Format(time.RFC3339), out)
			return nil
		},
	}
	cmd.Flags().StringVar(&dir, "dir", "", "CA directory in the plug-in layout (required)")
	cmd.Flags().StringVar(&idStr, "id", "", "SPIFFE ID to issue for (required)")
	cmd.Flags().StringVar(&out, "out", "", "directory to write the certificate into (required)")
	cmd.Flags().DurationVar(&ttl, "ttl", identity.DefaultCertTTL, "certificate lifetime (clamped to the CA's)")
	return cmd
}
