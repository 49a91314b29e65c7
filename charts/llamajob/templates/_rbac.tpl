{{/*
The operator's RBAC rules. operator/llamajob/permissions.py is the source of truth and says why
each rule exists; tests/test_chart.py renders the chart and fails if these differ from it.
*/}}

{{/* permissions.NAMESPACED: objects in the jobs' namespaces. */}}
{{- define "llamajob.rules.namespaced" -}}
- apiGroups: ["llamajob.dev"]
  resources: ["llamatrainingjobs"]
  verbs: ["list", "watch"]
- apiGroups: ["llamajob.dev"]
  resources: ["llamatrainingjobs/status"]
  verbs: ["patch"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["create", "delete", "list", "watch"]
- apiGroups: [""]
  resources: ["services", "configmaps"]
  verbs: ["create", "list", "watch"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- end -}}

{{/* Namespace scope's ClusterRole: permissions.CLUSTER + permissions.NAMESPACE_DISCOVERY
(only a namespace-confined kopf lists namespaces). */}}
{{- define "llamajob.rules.clusterForNamespaceScope" -}}
- apiGroups: [""]
  resources: ["nodes", "namespaces"]
  verbs: ["list", "watch"]
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["list", "watch"]
{{- end -}}

{{/* Cluster scope's ClusterRole adds permissions.CLUSTER after the namespaced rules. */}}
{{- define "llamajob.rules.clusterForClusterScope" -}}
- apiGroups: [""]
  resources: ["nodes"]
  verbs: ["list", "watch"]
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["list", "watch"]
{{- end -}}

{{/* permissions.NAMESPACED_PEERING */}}
{{- define "llamajob.rules.namespacedPeering" -}}
- apiGroups: ["kopf.dev"]
  resources: ["kopfpeerings"]
  verbs: ["list", "watch", "patch"]
{{- end -}}

{{/* permissions.CLUSTER_PEERING */}}
{{- define "llamajob.rules.clusterPeering" -}}
- apiGroups: ["kopf.dev"]
  resources: ["clusterkopfpeerings"]
  verbs: ["list", "watch", "patch"]
{{- end -}}
